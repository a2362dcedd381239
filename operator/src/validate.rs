//! Spec rules checked by the operator itself.
//!
//! The CRD schema and its CEL rules reject most bad input at the API server,
//! but not every cluster evaluates CEL and a URL pattern cannot tell whether a
//! URL parses. Whatever fails here becomes an `InvalidSpec` condition naming
//! the field, and nothing is applied.

use std::time::Duration;

use crate::crd::{
    DeliverySpec, MAX_HEADER_VALUE, MessagingEndpointSpec, NatsSpec, RESERVED_HEADERS, StorageType,
    TargetOptions,
};

/// Every problem found in a spec, each naming its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSpec(pub Vec<String>);

impl std::fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

/// Checks an endpoint: its name, then its spec (see [`validate_spec`]).
pub fn validate(name: &str, spec: &MessagingEndpointSpec) -> Result<(), InvalidSpec> {
    let mut problems = vec![];
    if let Some(problem) = check_name(name) {
        problems.push(problem);
    }
    if let Err(InvalidSpec(more)) = validate_spec(spec) {
        problems.extend(more);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(InvalidSpec(problems))
    }
}

/// The longest endpoint name: its Service `<name>-relay` must be a DNS-1035
/// label (63 characters), and the name is a label value (63) on every object.
pub const MAX_NAME_LENGTH: usize = 57;

/// An endpoint's name must make valid names for what the operator makes.
fn check_name(name: &str) -> Option<String> {
    let mut chars = name.chars();
    let starts_with_letter = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let ok = starts_with_letter
        && name.len() <= MAX_NAME_LENGTH
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    (!ok).then(|| {
        format!(
            "metadata.name: {name:?} must start with a letter, hold only a-z, 0-9 and -, \
             and have at most {MAX_NAME_LENGTH} characters (the relay's Service is \
             <name>-relay, a DNS-1035 label); make a new endpoint with such a name"
        )
    })
}

/// Checks a spec; returns all problems at once so a user fixes them in one go.
pub fn validate_spec(spec: &MessagingEndpointSpec) -> Result<(), InvalidSpec> {
    let mut problems = vec![];
    if let Err(e) = check_url(&spec.bot.url) {
        problems.push(format!("spec.bot.url: {e}"));
    }
    if let Err(e) = check_url(&spec.response_endpoint.url) {
        problems.push(format!("spec.responseEndpoint.url: {e}"));
    }
    if !(0..=10).contains(&spec.replicas) {
        problems.push(format!("spec.replicas: {} is outside 0..10", spec.replicas));
    } else if spec.replicas > 1 && spec.storage.type_ != StorageType::Nats {
        problems.push(format!(
            "spec.replicas: {} replicas need storage.type nats; the {} store serves one replica",
            spec.replicas,
            spec.storage.type_.as_flag()
        ));
    }
    match (&spec.storage.nats, spec.storage.type_) {
        (Some(nats), StorageType::Nats) => check_nats(nats, &mut problems),
        (None, StorageType::Nats) => {
            problems.push("spec.storage.nats: required with storage.type nats".to_string())
        }
        (Some(_), other) => problems.push(format!(
            "spec.storage.nats: set, but storage.type is {}",
            other.as_flag()
        )),
        (None, _) => {}
    }
    if let Some(delivery) = &spec.delivery {
        check_delivery(delivery, &mut problems);
    }
    check_target("spec.bot", &spec.bot.target, &mut problems);
    check_target(
        "spec.responseEndpoint",
        &spec.response_endpoint.target,
        &mut problems,
    );
    if !is_quantity(&spec.storage.size) {
        problems.push(format!(
            "spec.storage.size: {:?} is not a quantity like 1Gi",
            spec.storage.size
        ));
    }
    if let Some(reference) = &spec.credentials_secret_ref
        && !is_dns_subdomain(&reference.name)
    {
        problems.push(format!(
            "spec.credentialsSecretRef.name: {:?} is not a valid Secret name",
            reference.name
        ));
    }
    if let Some(image) = &spec.image
        && (image.trim().is_empty() || image.contains(char::is_whitespace))
    {
        problems.push(format!("spec.image: {image:?} is not an image reference"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(InvalidSpec(problems))
    }
}

fn check_nats(nats: &NatsSpec, problems: &mut Vec<String>) {
    if nats.urls.is_empty() {
        problems.push("spec.storage.nats.urls: name at least one server".to_string());
    }
    for (i, url) in nats.urls.iter().enumerate() {
        let host = url
            .strip_prefix("nats://")
            .or_else(|| url.strip_prefix("tls://"));
        let ok = host.is_some_and(|h| {
            !h.is_empty() && !h.contains(|c: char| c.is_whitespace() || "/?#@,".contains(c))
        });
        if !ok {
            problems.push(format!(
                "spec.storage.nats.urls[{i}]: {url:?} is not nats://host[:port] or tls://host[:port]"
            ));
        }
    }
    for (field, reference) in [
        ("credentialsSecretRef", &nats.credentials_secret_ref),
        ("tlsCaSecretRef", &nats.tls_ca_secret_ref),
    ] {
        if let Some(r) = reference
            && !is_dns_subdomain(&r.name)
        {
            problems.push(format!(
                "spec.storage.nats.{field}.name: {:?} is not a valid Secret name",
                r.name
            ));
        }
    }
    if let Some(n) = nats.stream_replicas
        && !(1..=5).contains(&n)
    {
        problems.push(format!(
            "spec.storage.nats.streamReplicas: {n} is outside 1..5"
        ));
    }
}

/// The most extra headers one target may have.
pub const MAX_HEADERS: usize = 32;

fn check_target(path: &str, target: &TargetOptions, problems: &mut Vec<String>) {
    if let Some(limit) = &target.rate_limit {
        if !(limit.per_second.is_finite() && (0.001..=100_000.0).contains(&limit.per_second)) {
            problems.push(format!(
                "{path}.rateLimit.perSecond: {} is outside 0.001..100000",
                limit.per_second
            ));
        }
        if let Some(burst) = limit.burst
            && !(1..=100_000).contains(&burst)
        {
            problems.push(format!(
                "{path}.rateLimit.burst: {burst} is outside 1..100000"
            ));
        }
    }
    if target.headers.len() > MAX_HEADERS {
        problems.push(format!(
            "{path}.headers: {} headers, at most {MAX_HEADERS}",
            target.headers.len()
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, header) in target.headers.iter().enumerate() {
        let at = format!("{path}.headers[{i}]");
        let lower = header.name.to_ascii_lowercase();
        if header.name.is_empty()
            || header.name.len() > 128
            || http::HeaderName::from_bytes(header.name.as_bytes()).is_err()
        {
            problems.push(format!("{at}.name: {:?} is not a header name", header.name));
        } else if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("webhook-") {
            problems.push(format!("{at}.name: the relay sets {} itself", header.name));
        } else if !seen.insert(lower) {
            problems.push(format!("{at}.name: {} is given twice", header.name));
        }
        match (&header.value, &header.value_from) {
            (Some(value), None) => {
                if value.len() > MAX_HEADER_VALUE || http::HeaderValue::from_str(value).is_err() {
                    problems.push(format!("{at}.value: not a valid header value"));
                }
            }
            (None, Some(from)) => {
                if !is_dns_subdomain(&from.secret_key_ref.name) {
                    problems.push(format!(
                        "{at}.valueFrom.secretKeyRef.name: {:?} is not a valid Secret name",
                        from.secret_key_ref.name
                    ));
                }
                let key = &from.secret_key_ref.key;
                if key.is_empty()
                    || key.len() > 253
                    || !key
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
                {
                    problems.push(format!(
                        "{at}.valueFrom.secretKeyRef.key: {key:?} is not a valid Secret key"
                    ));
                }
            }
            _ => problems.push(format!("{at}: give either value or valueFrom")),
        }
    }
    if let Some(r) = &target.client_certificate_secret_ref
        && !is_dns_subdomain(&r.name)
    {
        problems.push(format!(
            "{path}.clientCertificateSecretRef.name: {:?} is not a valid Secret name",
            r.name
        ));
    }
}

fn check_delivery(d: &DeliverySpec, problems: &mut Vec<String>) {
    let breaker = d.circuit_breaker.clone().unwrap_or_default();
    let durations = [
        ("circuitBreaker.probeInterval", &breaker.probe_interval),
        (
            "circuitBreaker.maxProbeInterval",
            &breaker.max_probe_interval,
        ),
        ("reachabilityProbeInterval", &d.reachability_probe_interval),
        ("maxWait", &d.max_wait),
        ("botTimeout", &d.bot_timeout),
        ("responseTimeout", &d.response_timeout),
        ("connectTimeout", &d.connect_timeout),
        ("retryInitialBackoff", &d.retry_initial_backoff),
        ("retryMaxBackoff", &d.retry_max_backoff),
        ("maxMessageAge", &d.max_message_age),
        ("dedupeWindow", &d.dedupe_window),
    ];
    for (field, value) in durations {
        if let Some(v) = value
            && let Err(e) = parse_duration(v)
        {
            problems.push(format!("spec.delivery.{field}: {e}"));
        }
    }
    if let (Some(initial), Some(max)) = (&d.retry_initial_backoff, &d.retry_max_backoff)
        && let (Ok(initial), Ok(max)) = (parse_duration(initial), parse_duration(max))
        && initial > max
    {
        problems.push("spec.delivery.retryInitialBackoff: exceeds retryMaxBackoff".to_string());
    }
    if let (Some(first), Some(max)) = (&breaker.probe_interval, &breaker.max_probe_interval)
        && let (Ok(first), Ok(max)) = (parse_duration(first), parse_duration(max))
        && first > max
    {
        problems.push(
            "spec.delivery.circuitBreaker.probeInterval: exceeds maxProbeInterval".to_string(),
        );
    }
    if let Some(n) = breaker.failures
        && !(0..=100_000).contains(&n)
    {
        problems.push(format!(
            "spec.delivery.circuitBreaker.failures: {n} is outside 0..100000"
        ));
    }
    for (field, value) in [
        ("circuitBreaker.probeInterval", &breaker.probe_interval),
        (
            "circuitBreaker.maxProbeInterval",
            &breaker.max_probe_interval,
        ),
    ] {
        if let Some(v) = value
            && let Ok(v) = parse_duration(v)
            && (v.is_zero() || v > Duration::from_secs(24 * 3600))
        {
            problems.push(format!(
                "spec.delivery.{field}: must be above 0s and at most 24h"
            ));
        }
    }
    if let Some(v) = &d.reachability_probe_interval
        && let Ok(v) = parse_duration(v)
        && !v.is_zero()
        && (v < Duration::from_secs(1) || v > Duration::from_secs(24 * 3600))
    {
        problems.push(
            "spec.delivery.reachabilityProbeInterval: must be 0s (no probes) or between 1s and 24h"
                .to_string(),
        );
    }
    if let Some(wait) = &d.max_wait
        && let Ok(wait) = parse_duration(wait)
        && wait > Duration::from_secs(300)
    {
        problems.push("spec.delivery.maxWait: exceeds 5m".to_string());
    }
    if let Some(n) = d.max_attempts
        && !(1..=1000).contains(&n)
    {
        problems.push(format!("spec.delivery.maxAttempts: {n} is outside 1..1000"));
    }
    if let Some(n) = d.max_replies_per_answer
        && !(1..=100_000).contains(&n)
    {
        problems.push(format!(
            "spec.delivery.maxRepliesPerAnswer: {n} is outside 1..100000"
        ));
    }
    if let Some(n) = d.max_body_bytes
        && !(1024..=16 * 1024 * 1024).contains(&n)
    {
        problems.push(format!(
            "spec.delivery.maxBodyBytes: {n} is outside 1024..16777216"
        ));
    }
}

/// An absolute http(s) URL with a host, as the relay will dial it.
fn check_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => return Err(format!("{url:?} has scheme {other:?}; use http or https")),
        None => {
            return Err(format!(
                "{url:?} is not absolute; start it with http:// or https://"
            ));
        }
    }
    match uri.host() {
        Some(host) if !host.is_empty() => Ok(()),
        _ => Err(format!("{url:?} has no host")),
    }
}

/// A duration in the subset both the relay (humantime) and CEL's `duration()` read:
/// `<integer><unit>` groups with units ms, s, m, h.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let mut rest = s;
    if rest.is_empty() {
        return Err("empty duration".to_string());
    }
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        let unit_len = ["ms", "s", "m", "h"]
            .iter()
            .find(|u| rest[digits..].starts_with(*u))
            .map(|u| u.len());
        match unit_len {
            Some(len) if digits > 0 => rest = &rest[digits + len..],
            _ => {
                return Err(format!(
                    "{s:?} is not a duration like 10s, 5m, 24h or 1h30m"
                ));
            }
        }
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

/// A Kubernetes quantity as used for storage sizes (`1Gi`, `500Mi`, `10G`, `1.5Gi`).
fn is_quantity(s: &str) -> bool {
    let number_len = s
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .count();
    let (number, suffix) = s.split_at(number_len);
    let number_ok = !number.is_empty()
        && !number.starts_with('.')
        && !number.ends_with('.')
        && number.matches('.').count() <= 1;
    number_ok && ["", "Ki", "Mi", "Gi", "Ti", "k", "M", "G", "T"].contains(&suffix)
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::{BotSpec, ResponseEndpointSpec, SecretReference, StorageSpec};

    pub(crate) fn spec() -> MessagingEndpointSpec {
        MessagingEndpointSpec {
            bot: BotSpec {
                url: "http://support-bot.shop.svc:8080/events".into(),
                target: Default::default(),
            },
            response_endpoint: ResponseEndpointSpec {
                url: "https://backend.example/bot-responses".into(),
                target: Default::default(),
            },
            replicas: 1,
            delivery: None,
            storage: StorageSpec::default(),
            credentials_secret_ref: None,
            image: None,
            resources: None,
            node_selector: None,
            tolerations: None,
            affinity: None,
            priority_class_name: None,
        }
    }

    fn problems(spec: &MessagingEndpointSpec) -> String {
        validate_spec(spec).unwrap_err().to_string()
    }

    #[test]
    fn delivery_controls_name_each_bad_field() {
        use crate::crd::{
            CircuitBreakerSpec, HeaderValueSource, RateLimit, SecretKeyReference, TargetHeader,
        };
        let header = |name: &str, value: Option<&str>, secret: Option<(&str, &str)>| TargetHeader {
            name: name.into(),
            value: value.map(String::from),
            value_from: secret.map(|(name, key)| HeaderValueSource {
                secret_key_ref: SecretKeyReference {
                    name: name.into(),
                    key: key.into(),
                },
            }),
        };
        let mut s = spec();
        s.bot.target.rate_limit = Some(RateLimit {
            per_second: 0.0,
            burst: Some(0),
        });
        s.bot.target.headers = vec![
            header("X-Key", Some("a"), None),
            header("x-key", Some("b"), None),
            header("Webhook-Id", Some("c"), None),
            header("Bad Name", Some("d"), None),
            header("X-Both", Some("e"), Some(("s", "k"))),
            header("X-Secret", None, Some(("Not_A_Name", "k/ey"))),
            header("X-Line", Some("a\nb"), None),
        ];
        s.delivery = Some(DeliverySpec {
            circuit_breaker: Some(CircuitBreakerSpec {
                failures: Some(-1),
                probe_interval: Some("10m".into()),
                max_probe_interval: Some("1m".into()),
            }),
            max_wait: Some("10m".into()),
            reachability_probe_interval: Some("soon".into()),
            ..DeliverySpec::default()
        });
        let p = problems(&s);
        for expected in [
            "spec.bot.rateLimit.perSecond: 0 is outside 0.001..100000",
            "spec.bot.rateLimit.burst: 0 is outside 1..100000",
            "spec.bot.headers[1].name: x-key is given twice",
            "spec.bot.headers[2].name: the relay sets Webhook-Id itself",
            "spec.bot.headers[3].name: \"Bad Name\" is not a header name",
            "spec.bot.headers[4]: give either value or valueFrom",
            "spec.bot.headers[5].valueFrom.secretKeyRef.name: \"Not_A_Name\" is not a valid Secret name",
            "spec.bot.headers[5].valueFrom.secretKeyRef.key: \"k/ey\" is not a valid Secret key",
            "spec.bot.headers[6].value: not a valid header value",
            "spec.delivery.circuitBreaker.probeInterval: exceeds maxProbeInterval",
            "spec.delivery.circuitBreaker.failures: -1 is outside 0..100000",
            "spec.delivery.maxWait: exceeds 5m",
            "spec.delivery.reachabilityProbeInterval:",
        ] {
            assert!(p.contains(expected), "{expected} not in {p}");
        }
        let mut s = spec();
        s.delivery = Some(DeliverySpec {
            circuit_breaker: Some(CircuitBreakerSpec {
                failures: None,
                probe_interval: Some("0s".into()),
                max_probe_interval: Some("25h".into()),
            }),
            reachability_probe_interval: Some("500ms".into()),
            ..DeliverySpec::default()
        });
        let p = problems(&s);
        for expected in [
            "spec.delivery.circuitBreaker.probeInterval: must be above 0s and at most 24h",
            "spec.delivery.circuitBreaker.maxProbeInterval: must be above 0s and at most 24h",
            "spec.delivery.reachabilityProbeInterval: must be 0s (no probes) or between 1s and 24h",
        ] {
            assert!(p.contains(expected), "{expected} not in {p}");
        }
    }

    #[test]
    fn accepts_the_design_example() {
        assert_eq!(validate_spec(&spec()), Ok(()));
    }

    #[test]
    fn rejects_urls_that_do_not_parse_or_are_not_http() {
        let mut s = spec();
        s.bot.url = "ftp://bot/events".into();
        s.response_endpoint.url = "backend.example/x".into();
        let p = problems(&s);
        assert!(
            p.contains("spec.bot.url: \"ftp://bot/events\" has scheme \"ftp\""),
            "{p}"
        );
        assert!(p.contains("spec.responseEndpoint.url:"), "{p}");

        s = spec();
        s.bot.url = "http://exa mple/".into();
        assert!(problems(&s).starts_with("spec.bot.url: \"http://exa mple/\" is not a URL"));
    }

    #[test]
    fn more_replicas_than_the_store_serves_is_named() {
        let mut s = spec();
        s.replicas = 3;
        assert_eq!(
            problems(&s),
            "spec.replicas: 3 replicas need storage.type nats; the embedded store serves one replica"
        );
        s.replicas = 0;
        assert_eq!(validate_spec(&s), Ok(()));
    }

    #[test]
    fn names_must_make_valid_service_names() {
        assert_eq!(validate("support-2", &spec()), Ok(()));
        let long = "a".repeat(MAX_NAME_LENGTH);
        assert_eq!(validate(&long, &spec()), Ok(()));
        for bad in ["1abc", "a.b", "a_b", "ab-", &format!("{long}a")] {
            let e = validate(bad, &spec()).unwrap_err().to_string();
            assert!(e.starts_with("metadata.name: "), "{bad}: {e}");
        }
        // Name and spec problems come together.
        let mut s = spec();
        s.replicas = 11;
        assert_eq!(validate("1abc", &s).unwrap_err().0.len(), 2);
    }

    #[test]
    fn the_nats_store_takes_replicas_and_needs_its_servers() {
        let mut s = spec();
        s.replicas = 3;
        s.storage.type_ = StorageType::Nats;
        assert_eq!(
            problems(&s),
            "spec.storage.nats: required with storage.type nats"
        );
        s.storage.nats = Some(NatsSpec {
            urls: vec!["nats://nats.nats.svc:4222".into(), "tls://n2:4222".into()],
            credentials_secret_ref: None,
            tls_ca_secret_ref: None,
            stream_replicas: Some(3),
        });
        assert_eq!(validate_spec(&s), Ok(()));
        let nats = s.storage.nats.as_mut().unwrap();
        nats.urls = vec!["http://nats:4222".into(), "nats://a,b".into()];
        nats.stream_replicas = Some(7);
        assert_eq!(
            problems(&s),
            "spec.storage.nats.urls[0]: \"http://nats:4222\" is not nats://host[:port] or tls://host[:port]; \
             spec.storage.nats.urls[1]: \"nats://a,b\" is not nats://host[:port] or tls://host[:port]; \
             spec.storage.nats.streamReplicas: 7 is outside 1..5"
        );
        s.storage.type_ = StorageType::Memory;
        s.replicas = 1;
        s.storage.nats.as_mut().unwrap().urls = vec!["nats://n:4222".into()];
        s.storage.nats.as_mut().unwrap().stream_replicas = None;
        assert_eq!(
            problems(&s),
            "spec.storage.nats: set, but storage.type is memory"
        );
    }

    #[test]
    fn durations_counts_and_backoff_order() {
        let mut s = spec();
        s.delivery = Some(DeliverySpec {
            bot_timeout: Some("10s".into()),
            dedupe_window: Some("24h".into()),
            connect_timeout: Some("1h30m".into()),
            ..Default::default()
        });
        assert_eq!(validate_spec(&s), Ok(()));

        s.delivery = Some(DeliverySpec {
            bot_timeout: Some("ten seconds".into()),
            retry_initial_backoff: Some("10m".into()),
            retry_max_backoff: Some("1m".into()),
            max_attempts: Some(0),
            max_body_bytes: Some(10),
            max_replies_per_answer: Some(0),
            ..Default::default()
        });
        let p = problems(&s);
        assert!(
            p.contains("spec.delivery.botTimeout: \"ten seconds\" is not a duration"),
            "{p}"
        );
        assert!(
            p.contains("spec.delivery.retryInitialBackoff: exceeds retryMaxBackoff"),
            "{p}"
        );
        assert!(
            p.contains("spec.delivery.maxAttempts: 0 is outside 1..1000"),
            "{p}"
        );
        assert!(
            p.contains("spec.delivery.maxBodyBytes: 10 is outside"),
            "{p}"
        );
        assert!(
            p.contains("spec.delivery.maxRepliesPerAnswer: 0 is outside 1..100000"),
            "{p}"
        );
    }

    #[test]
    fn duration_subset_matches_the_schema_pattern() {
        for ok in ["1ms", "10s", "5m", "24h", "1h30m"] {
            assert!(parse_duration(ok).is_ok(), "{ok}");
        }
        for bad in ["", "10", "s", "1d", "1.5s", "10 s", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn storage_size_and_secret_name() {
        let mut s = spec();
        s.storage.size = "lots".into();
        s.credentials_secret_ref = Some(SecretReference {
            name: "My_Secret".into(),
        });
        let p = problems(&s);
        assert!(p.contains("spec.storage.size: \"lots\""), "{p}");
        assert!(
            p.contains("spec.credentialsSecretRef.name: \"My_Secret\""),
            "{p}"
        );
        for ok in ["1Gi", "500Mi", "10G", "1.5Gi"] {
            assert!(is_quantity(ok), "{ok}");
        }
    }
}
