//! The generated CRD: `crds/` matches the Rust type, and the schema is one the
//! API server accepts (structural) and kubectl validates against.

use serde_json::Value;

fn crd_json() -> Value {
    serde_json::to_value(botrelay_operator::crd()).unwrap()
}

#[test]
fn crds_folder_matches_crdgen_output() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/messagingendpoints.botrelay.dev.yaml"
    );
    let on_disk =
        std::fs::read_to_string(path).expect("crds/messagingendpoints.botrelay.dev.yaml exists");
    assert!(
        on_disk == botrelay_operator::crd_yaml(),
        "crds/ is stale; regenerate with `cargo run -p botrelay-operator --bin crdgen > crds/messagingendpoints.botrelay.dev.yaml`"
    );
}

/// Walks every schema node and collects breaches of the structural-schema rules
/// (https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#specifying-a-structural-schema)
/// and of what kubectl's client-side validation chokes on.
fn structural_violations(node: &Value, path: &str, out: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        out.push(format!("{path}: schema node is not an object"));
        return;
    };
    for forbidden in [
        "$ref",
        "$schema",
        "definitions",
        "$defs",
        "oneOf",
        "anyOf",
        "allOf",
        "not",
    ] {
        if obj.contains_key(forbidden) {
            out.push(format!("{path}: has `{forbidden}`"));
        }
    }
    let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if preserve {
        // No field of MessagingEndpoint is free-form JSON.
        out.push(format!(
            "{path}: x-kubernetes-preserve-unknown-fields where no free-form JSON is meant"
        ));
    }
    match obj.get("type").and_then(Value::as_str) {
        Some("object" | "array" | "string" | "integer" | "number" | "boolean") => {}
        Some(other) => out.push(format!("{path}: unknown type `{other}`")),
        None if int_or_string => {}
        None => out.push(format!(
            "{path}: no `type` (the API server answers `type: Required value`)"
        )),
    }
    if let Some(values) = obj.get("enum").and_then(Value::as_array) {
        if values.iter().any(Value::is_null) {
            out.push(format!(
                "{path}: `enum` contains null (kubectl: unknown object type nil)"
            ));
        }
        let ty = obj.get("type").and_then(Value::as_str);
        for v in values {
            let fits = match ty {
                Some("string") => v.is_string(),
                Some("integer") => v.is_i64(),
                _ => true,
            };
            if !fits {
                out.push(format!("{path}: enum value {v} does not match type {ty:?}"));
            }
        }
    }
    if obj.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
        let keys: Vec<&str> = obj["x-kubernetes-list-map-keys"]
            .as_array()
            .map(|k| k.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let required: Vec<&str> = obj["items"]["required"]
            .as_array()
            .map(|k| k.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for key in keys {
            if !required.contains(&key) {
                out.push(format!(
                    "{path}: list-map key `{key}` is not required in items"
                ));
            }
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            structural_violations(child, &format!("{path}.{name}"), out);
        }
        if let Some(required) = obj.get("required").and_then(Value::as_array) {
            for r in required {
                if !props.contains_key(r.as_str().unwrap_or_default()) {
                    out.push(format!("{path}: required `{r}` is not a property"));
                }
            }
        }
    }
    if let Some(items) = obj.get("items") {
        structural_violations(items, &format!("{path}[]"), out);
    } else if obj.get("type").and_then(Value::as_str) == Some("array") {
        out.push(format!("{path}: array without `items`"));
    }
    if let Some(additional) = obj.get("additionalProperties") {
        if additional.is_object() {
            structural_violations(additional, &format!("{path}{{}}"), out);
        }
        if obj.contains_key("properties") {
            out.push(format!("{path}: both properties and additionalProperties"));
        }
    }
}

#[test]
fn schema_is_structural() {
    let crd = crd_json();
    let versions = crd["spec"]["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1);
    let schema = &versions[0]["schema"]["openAPIV3Schema"];
    let mut violations = vec![];
    structural_violations(schema, "", &mut violations);
    assert!(
        violations.is_empty(),
        "structural-schema violations:\n{}",
        violations.join("\n")
    );

    // The root may only speak of apiVersion, kind, metadata, spec and status;
    // metadata may not be constrained beyond name/generateName.
    for key in schema["properties"].as_object().unwrap().keys() {
        assert!(
            ["apiVersion", "kind", "metadata", "spec", "status"].contains(&key.as_str()),
            "unexpected root property {key}"
        );
    }
    if let Some(metadata) = schema["properties"].get("metadata") {
        assert_eq!(metadata, &serde_json::json!({"type": "object"}));
    }
}

#[test]
fn walker_catches_the_known_derive_mistakes() {
    // What kube's derive emits for a serde_json::Value field and for an Option of an enum.
    let bad = serde_json::json!({
        "type": "object",
        "properties": {
            "free": {},
            "level": {"type": "string", "enum": ["debug", "info", null], "nullable": true},
            "nested": {"$ref": "#/definitions/Nested"}
        }
    });
    let mut violations = vec![];
    structural_violations(&bad, "", &mut violations);
    let text = violations.join("\n");
    assert!(text.contains(".free: no `type`"), "{text}");
    assert!(text.contains(".level: `enum` contains null"), "{text}");
    assert!(text.contains(".nested: has `$ref`"), "{text}");
}

#[test]
fn crd_names_scope_columns_and_status_subresource() {
    let crd = crd_json();
    let spec = &crd["spec"];
    assert_eq!(crd["metadata"]["name"], "messagingendpoints.botrelay.dev");
    assert_eq!(spec["group"], "botrelay.dev");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["kind"], "MessagingEndpoint");
    assert_eq!(spec["names"]["shortNames"], serde_json::json!(["mep"]));
    let version = &spec["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["subresources"]["status"], serde_json::json!({}));
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c.get("priority").is_none())
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        [
            "Ready",
            "Bot",
            "Response Endpoint",
            "Pods Ready",
            "Pods",
            "Webhook URL",
            "Age"
        ]
    );
}

#[test]
fn schema_carries_validation_and_defaults() {
    let crd = crd_json();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let props = &spec["properties"];
    assert_eq!(
        spec["required"],
        serde_json::json!(["bot", "responseEndpoint"])
    );
    assert!(
        props["bot"]["properties"]["url"]["pattern"]
            .as_str()
            .unwrap()
            .starts_with("^https?://")
    );
    assert_eq!(props["replicas"]["default"], 1);
    assert_eq!(props["replicas"]["minimum"].as_f64(), Some(0.0));
    assert_eq!(props["replicas"]["maximum"].as_f64(), Some(10.0));
    assert_eq!(
        props["storage"]["properties"]["type"]["enum"],
        serde_json::json!(["embedded", "memory", "nats"])
    );
    assert_eq!(
        props["storage"]["properties"]["type"]["default"],
        "embedded"
    );
    let delivery = &props["delivery"]["properties"];
    assert!(delivery["botTimeout"]["pattern"].is_string());
    assert_eq!(delivery["maxAttempts"]["minimum"].as_f64(), Some(1.0));
    // Cross-field rules are CEL.
    let rules: Vec<&str> = [
        &spec["x-kubernetes-validations"],
        &props["delivery"]["x-kubernetes-validations"],
    ]
    .iter()
    .flat_map(|v| v.as_array().unwrap())
    .map(|r| r["rule"].as_str().unwrap())
    .collect();
    assert!(rules.iter().any(|r| r.contains("self.replicas <= 1")));
    assert!(rules.iter().any(|r| {
        r.contains("duration(self.retryInitialBackoff) <= duration(self.retryMaxBackoff)")
    }));
}

#[test]
fn readme_example_is_a_valid_endpoint_that_uses_every_field() {
    use botrelay_operator::crd::MessagingEndpoint;
    let readme = include_str!("../README.md");
    let block = readme
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README.md has a yaml example");
    let raw: Value = serde_saphyr::from_str(block).expect("the example is YAML");
    let endpoint: MessagingEndpoint =
        serde_json::from_value(raw.clone()).expect("the example decodes");
    botrelay_operator::validate::validate_spec(&endpoint.spec).expect("the example is valid");
    // Nothing in the example is silently ignored: it survives a round trip.
    let back = serde_json::to_value(&endpoint.spec).unwrap();
    fn keys(v: &Value, prefix: &str, out: &mut Vec<String>) {
        if let Some(map) = v.as_object() {
            for (k, child) in map {
                let path = format!("{prefix}.{k}");
                out.push(path.clone());
                keys(child, &path, out);
            }
        }
    }
    let (mut written, mut kept) = (vec![], vec![]);
    keys(&raw["spec"], "spec", &mut written);
    keys(&back, "spec", &mut kept);
    for key in &written {
        assert!(
            kept.contains(key),
            "{key} in the README example is not a field"
        );
    }
    // Every top-level spec field of the schema appears in the example or its comment.
    let crd = crd_json();
    let props =
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            .as_object()
            .unwrap();
    for field in props.keys() {
        assert!(
            block.contains(field.as_str()),
            "the README example does not mention spec.{field}"
        );
    }
}

/// The CEL rules, evaluated as the API server would (schema defaults applied first).
#[test]
fn cel_rules_accept_good_specs_and_reject_cross_field_mistakes() {
    let crd = crd_json();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let validator = kube_cel::Validator::new();
    let object = |spec: Value| {
        let mut base = serde_json::json!({
            "bot": {"url": "http://bot.shop.svc/events"},
            "responseEndpoint": {"url": "https://backend.example/r"},
        });
        for (k, v) in spec.as_object().unwrap() {
            base[k] = v.clone();
        }
        serde_json::json!({"apiVersion": "botrelay.dev/v1alpha1", "kind": "MessagingEndpoint",
                           "metadata": {"name": "x"}, "spec": base})
    };
    let check = |spec: Value| validator.validate(schema, &object(spec), None);

    assert!(check(serde_json::json!({})).is_ok(), "defaults pass");
    assert!(check(serde_json::json!({"replicas": 1, "delivery": {"retryInitialBackoff": "1s", "retryMaxBackoff": "5m"}})).is_ok());
    assert!(check(serde_json::json!({"delivery": {"retryInitialBackoff": "90s", "retryMaxBackoff": "1h30m"}})).is_ok());

    let too_many = check(serde_json::json!({"replicas": 2})).unwrap_err();
    assert!(
        format!("{too_many:?}").contains("replicas above 1 need storage.type nats"),
        "{too_many:?}"
    );
    let nats = serde_json::json!({"type": "nats", "nats": {"urls": ["nats://nats.nats.svc:4222"]}});
    assert!(check(serde_json::json!({"replicas": 3, "storage": nats})).is_ok());
    for storage in [
        serde_json::json!({"type": "nats"}),
        serde_json::json!({"nats": {"urls": ["nats://n:4222"]}}),
        serde_json::json!({"type": "memory", "nats": {"urls": ["nats://n:4222"]}}),
    ] {
        let wrong = check(serde_json::json!({"storage": storage})).unwrap_err();
        assert!(
            format!("{wrong:?}").contains("storage.nats is set exactly when storage.type is nats"),
            "{storage}: {wrong:?}"
        );
    }
    // Transition rules: the storage class is fixed once set (or unset).
    let with_class = |class: Option<&str>| {
        let mut storage = serde_json::json!({"type": "embedded", "size": "1Gi"});
        if let Some(c) = class {
            storage["storageClassName"] = serde_json::json!(c);
        }
        object(serde_json::json!({"storage": storage}))
    };
    assert!(
        validator
            .validate(
                schema,
                &with_class(Some("fast")),
                Some(&with_class(Some("fast")))
            )
            .is_ok()
    );
    for (new, old) in [
        (Some("slow"), Some("fast")),
        (Some("fast"), None),
        (None, Some("fast")),
    ] {
        let changed = validator
            .validate(schema, &with_class(new), Some(&with_class(old)))
            .unwrap_err();
        assert!(
            format!("{changed:?}").contains("storageClassName cannot change"),
            "{old:?} -> {new:?}: {changed:?}"
        );
    }
    // Delivery controls: headers have a value or a Secret's key, never both,
    // and never one of the headers the relay sets itself.
    let bot_with = |extra: Value| {
        let mut bot = serde_json::json!({"url": "http://bot.shop.svc/events"});
        for (k, v) in extra.as_object().unwrap() {
            bot[k] = v.clone();
        }
        serde_json::json!({"bot": bot})
    };
    let good = check(bot_with(serde_json::json!({
        "rateLimit": {"perSecond": 0.5, "burst": 3},
        "headers": [{"name": "X-Tenant", "value": "shop"},
                    {"name": "X-Api-Key", "valueFrom": {"secretKeyRef": {"name": "bot-api", "key": "key"}}}],
        "clientCertificateSecretRef": {"name": "bot-client"}
    })));
    assert!(good.is_ok(), "{good:?}");
    for (header, says) in [
        (
            serde_json::json!({"name": "X-Api-Key"}),
            "either value or valueFrom",
        ),
        (
            serde_json::json!({"name": "X-Api-Key", "value": "a",
                               "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}),
            "either value or valueFrom",
        ),
        (
            serde_json::json!({"name": "Content-Type", "value": "text/plain"}),
            "sets this header itself",
        ),
        (
            serde_json::json!({"name": "Webhook-Signature", "value": "v1,x"}),
            "sets this header itself",
        ),
        (
            serde_json::json!({"name": "TRACEPARENT", "value": "x"}),
            "sets this header itself",
        ),
    ] {
        let wrong = check(bot_with(serde_json::json!({"headers": [header.clone()]}))).unwrap_err();
        assert!(format!("{wrong:?}").contains(says), "{header}: {wrong:?}");
    }
    // The CEL rule names the same headers as the list the operator and the relay check.
    for name in botrelay_operator::crd::RESERVED_HEADERS {
        let upper = name.to_ascii_uppercase();
        let wrong = check(bot_with(
            serde_json::json!({"headers": [{"name": upper, "value": "x"}]}),
        ))
        .unwrap_err();
        assert!(
            format!("{wrong:?}").contains("sets this header itself"),
            "{name}: {wrong:?}"
        );
    }
    let breaker = check(serde_json::json!({"delivery": {"circuitBreaker": {
        "probeInterval": "10m", "maxProbeInterval": "1m"}}}))
    .unwrap_err();
    assert!(
        format!("{breaker:?}").contains("probeInterval must not exceed maxProbeInterval"),
        "{breaker:?}"
    );
    assert!(
        check(
            serde_json::json!({"delivery": {"circuitBreaker": {"failures": 5,
        "probeInterval": "5s", "maxProbeInterval": "5m"}, "reachabilityProbeInterval": "30s",
        "maxWait": "5m"}})
        )
        .is_ok()
    );
    for (delivery, says) in [
        (
            serde_json::json!({"reachabilityProbeInterval": "500ms"}),
            "reachabilityProbeInterval must be 0s",
        ),
        (
            serde_json::json!({"circuitBreaker": {"probeInterval": "0s"}}),
            "probeInterval must be above 0s",
        ),
        (
            serde_json::json!({"circuitBreaker": {"maxProbeInterval": "25h"}}),
            "maxProbeInterval must be above 0s and at most 24h",
        ),
    ] {
        let wrong = check(serde_json::json!({"delivery": delivery.clone()})).unwrap_err();
        assert!(format!("{wrong:?}").contains(says), "{delivery}: {wrong:?}");
    }
    assert!(check(serde_json::json!({"delivery": {"reachabilityProbeInterval": "0s"}})).is_ok());
    let long_wait = check(serde_json::json!({"delivery": {"maxWait": "6m"}})).unwrap_err();
    assert!(
        format!("{long_wait:?}").contains("maxWait must not exceed 5m"),
        "{long_wait:?}"
    );

    let backwards = check(
        serde_json::json!({"delivery": {"retryInitialBackoff": "10m", "retryMaxBackoff": "1m"}}),
    )
    .unwrap_err();
    assert!(
        format!("{backwards:?}").contains("retryInitialBackoff must not exceed retryMaxBackoff"),
        "{backwards:?}"
    );
}
