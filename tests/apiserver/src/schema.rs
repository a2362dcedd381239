//! What a real API server does with a CRD's structural schema on every write:
//! drop the fields the schema does not know (pruning) and fill in the
//! `default` of every absent field whose parent is present (defaulting).
//! Validation (types, patterns, bounds, CEL) is not done here on purpose: the
//! operator's tests store malformed objects to see how it copes.

use serde_json::Value;

/// Prunes and defaults a whole object; `apiVersion`, `kind` and `metadata` are kept as they are.
pub fn prune_and_default(object: &mut Value, schema: &Value) {
    let Some(map) = object.as_object_mut() else {
        return;
    };
    let properties = schema["properties"].as_object();
    let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
    map.retain(|k, _| {
        preserve
            || matches!(k.as_str(), "apiVersion" | "kind" | "metadata")
            || properties.is_some_and(|p| p.contains_key(k))
    });
    for (k, sub) in properties.into_iter().flatten() {
        if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        if let Some(value) = map.get_mut(k) {
            visit(value, sub);
        }
    }
}

fn visit(value: &mut Value, schema: &Value) {
    match value {
        Value::Object(map) => {
            let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
            if let Some(properties) = schema["properties"].as_object() {
                if !preserve {
                    map.retain(|k, _| properties.contains_key(k));
                }
                for (k, sub) in properties {
                    if !map.contains_key(k)
                        && let Some(default) = sub.get("default")
                    {
                        map.insert(k.clone(), default.clone());
                    }
                    if let Some(v) = map.get_mut(k) {
                        visit(v, sub);
                    }
                }
            } else if let Some(additional) =
                schema.get("additionalProperties").filter(|a| a.is_object())
            {
                for v in map.values_mut() {
                    visit(v, additional);
                }
            } else if !preserve && schema["x-kubernetes-int-or-string"] != true {
                // An object the schema says nothing about the fields of: all unknown.
                map.clear();
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    visit(item, item_schema);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {
                "replicas": {"type": "integer", "default": 1},
                "storage": {"type": "object", "default": {}, "properties": {
                    "type": {"type": "string", "default": "embedded"},
                }},
                "selector": {"type": "object", "additionalProperties": {"type": "string"}},
                "list": {"type": "array", "items": {"type": "object", "properties": {"a": {"type": "string"}}}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            }},
            "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
        }})
    }

    #[test]
    fn unknown_fields_are_pruned_at_every_depth() {
        let mut o = json!({
            "apiVersion": "x/v1", "kind": "X", "metadata": {"name": "n", "whatever": 1},
            "spec": {"replicas": 2, "typo": 1, "selector": {"a": "b"},
                     "list": [{"a": "x", "b": "y"}], "free": {"anything": {"goes": 1}},
                     "storage": {"type": "memory"}},
            "status": {"ready": true, "readyReplicas": 1},
            "extra": true,
        });
        prune_and_default(&mut o, &schema());
        assert_eq!(
            o,
            json!({
                "apiVersion": "x/v1", "kind": "X", "metadata": {"name": "n", "whatever": 1},
                "spec": {"replicas": 2, "selector": {"a": "b"}, "list": [{"a": "x"}],
                         "free": {"anything": {"goes": 1}}, "storage": {"type": "memory"}},
                "status": {"ready": true},
            })
        );
    }

    #[test]
    fn absent_fields_get_their_defaults_nested_defaults_too() {
        let mut o = json!({"apiVersion": "x/v1", "kind": "X", "metadata": {}, "spec": {}});
        prune_and_default(&mut o, &schema());
        assert_eq!(o["spec"]["replicas"], 1);
        assert_eq!(o["spec"]["storage"], json!({"type": "embedded"}));
        // No parent, no default: status stays absent.
        assert!(o.get("status").is_none());
    }
}
