//! Route data from outside the config file: the Redis JSON forms and the
//! realm mapping, parsed and validated into rules (pure; no I/O).
//!
//! Accepted rule documents (the value of `{prefix}routing:rules`):
//! - the original gateway's object keyed by server type:
//!   `{"10": {"server_type": 10, "service_name": "account", ...}, ...}`
//!   (`server_type` may be left out; the key supplies it);
//! - a JSON array of rules (several worlds per server type);
//! - for files handled by `game-gateway routes ...`, also a bundle
//!   `{"rules": <either form>, "realm_mapping": {"7": "host:port"}}`.
//!
//! Any problem rejects the whole document: every reason is returned.

use crate::routing::{Endpoint, RawRule, RouteRule};
use serde_json::Value;

/// Rules and realm mapping from one source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RouteSet {
    pub rules: Vec<RouteRule>,
    pub realms: Vec<(u16, Endpoint)>,
}

fn rule_from_value(v: Value, at: &str, errs: &mut Vec<String>) -> Option<RouteRule> {
    let raw: RawRule = match serde_json::from_value(v) {
        Ok(r) => r,
        Err(e) => {
            errs.push(format!("{at}: {e}"));
            return None;
        }
    };
    match raw.validate() {
        Ok(r) => Some(r),
        Err(list) => {
            for (field, reason) in list {
                errs.push(format!("{at}.{field}: {reason}"));
            }
            None
        }
    }
}

/// Parses a rules document (object keyed by server type, or array).
pub(crate) fn parse_rules_value(v: Value) -> Result<Vec<RouteRule>, Vec<String>> {
    let mut errs = Vec::new();
    let mut rules = Vec::new();
    match v {
        Value::Array(items) => {
            for (i, item) in items.into_iter().enumerate() {
                if let Some(r) = rule_from_value(item, &format!("rules[{i}]"), &mut errs) {
                    rules.push(r);
                }
            }
        }
        Value::Object(map) => {
            for (k, mut item) in map {
                let at = format!("rules[{k:?}]");
                let Ok(key_type) = k.parse::<u8>() else {
                    errs.push(format!("{at}: key is not a server type 0..=255"));
                    continue;
                };
                if let Value::Object(o) = &mut item {
                    match o.get("server_type").and_then(Value::as_i64) {
                        None if !o.contains_key("server_type") => {
                            o.insert("server_type".into(), Value::from(key_type));
                        }
                        Some(t) if t == key_type as i64 => {}
                        _ => {
                            errs.push(format!("{at}.server_type: does not match its key {k}"));
                            continue;
                        }
                    }
                }
                if let Some(r) = rule_from_value(item, &at, &mut errs) {
                    rules.push(r);
                }
            }
        }
        other => {
            errs.push(format!("rules: expected an object keyed by server type or an array, found {}", kind(&other)))
        }
    }
    let mut seen = ahash::AHashSet::new();
    for r in &rules {
        if !seen.insert(r.key()) {
            errs.push(format!("duplicate rule for server_type {} world_id {}", r.server_type, r.world_id));
        }
    }
    if errs.is_empty() {
        rules.sort_by_key(|r| r.key());
        Ok(rules)
    } else {
        Err(errs)
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses the rules JSON text stored in Redis.
pub(crate) fn parse_rules_json(text: &str) -> Result<Vec<RouteRule>, Vec<String>> {
    let v: Value = serde_json::from_str(text).map_err(|e| vec![format!("rules: invalid JSON: {e}")])?;
    parse_rules_value(v)
}

/// Parses realm id -> `host:port` pairs (the `{prefix}realm:mapping` hash).
pub(crate) fn parse_realm_mapping<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Vec<(u16, Endpoint)>, Vec<String>> {
    let mut errs = Vec::new();
    let mut out = Vec::new();
    for (k, v) in pairs {
        let realm = match k.trim().parse::<u16>() {
            Ok(r) if r <= 32767 => r,
            _ => {
                errs.push(format!("realm_mapping[{k:?}]: realm id is not 0..=32767"));
                continue;
            }
        };
        match Endpoint::parse(v.trim()) {
            Ok(e) => out.push((realm, e)),
            Err(e) => errs.push(format!("realm_mapping[{k:?}]: {e}")),
        }
    }
    if errs.is_empty() {
        out.sort_by_key(|(r, _)| *r);
        Ok(out)
    } else {
        Err(errs)
    }
}

/// Parses a rules file: a bundle with `rules` / `realm_mapping`, or a plain
/// rules document.
pub fn parse_bundle(text: &str) -> Result<RouteSet, Vec<String>> {
    let v: Value = serde_json::from_str(text).map_err(|e| vec![format!("invalid JSON: {e}")])?;
    let is_bundle = matches!(&v, Value::Object(o) if o.contains_key("rules") || o.contains_key("realm_mapping"));
    if !is_bundle {
        return Ok(RouteSet { rules: parse_rules_value(v)?, realms: vec![] });
    }
    let Value::Object(mut o) = v else { unreachable!() };
    let mut errs = Vec::new();
    let rules = match o.remove("rules") {
        Some(r) => parse_rules_value(r).unwrap_or_else(|e| {
            errs.extend(e);
            vec![]
        }),
        None => vec![],
    };
    let realms = match o.remove("realm_mapping") {
        Some(Value::Object(m)) => {
            let pairs: Vec<(String, String)> =
                m.into_iter().map(|(k, v)| (k, v.as_str().unwrap_or("").to_string())).collect();
            parse_realm_mapping(pairs.iter().map(|(a, b)| (a.as_str(), b.as_str()))).unwrap_or_else(|e| {
                errs.extend(e);
                vec![]
            })
        }
        Some(other) => {
            errs.push(format!("realm_mapping: expected an object, found {}", kind(&other)));
            vec![]
        }
        None => vec![],
    };
    for k in o.keys() {
        errs.push(format!("{k}: unknown key (expected rules, realm_mapping)"));
    }
    if errs.is_empty() {
        Ok(RouteSet { rules, realms })
    } else {
        Err(errs)
    }
}

/// Static rules overlaid with Redis rules: a Redis rule replaces the static
/// rule of the same (server type, world); static rules Redis lacks remain.
pub(crate) fn merge(static_rules: &[RouteRule], redis: Option<&RouteSet>) -> RouteSet {
    let mut by_key: std::collections::BTreeMap<(u8, u16), RouteRule> =
        static_rules.iter().map(|r| (r.key(), r.clone())).collect();
    let mut realms = vec![];
    if let Some(set) = redis {
        for r in &set.rules {
            by_key.insert(r.key(), r.clone());
        }
        realms = set.realms.clone();
    }
    RouteSet { rules: by_key.into_values().collect(), realms }
}

/// A fingerprint of a route set's values (every field of every rule, the
/// realm mapping), to publish snapshots only on change. Stable within a
/// process, which is all the comparison with the last published set needs.
pub(crate) fn fingerprint(set: &RouteSet) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    set.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The original gateway's sample data: object form, type 200 with no endpoints.
    pub const ORIGINAL_SAMPLE: &str = r#"{
        "10": {"server_type": 10, "service_name": "account", "strategy": "round_robin", "endpoints": ["127.0.0.1:19711"]},
        "15": {"server_type": 15, "service_name": "version", "strategy": "round_robin", "endpoints": ["127.0.0.1:19712"]},
        "200": {"server_type": 200, "service_name": "game", "strategy": "consistent_hash", "endpoints": []}
    }"#;

    #[test]
    fn original_object_form_loads() {
        let rules = parse_rules_json(ORIGINAL_SAMPLE).unwrap();
        let types: Vec<u8> = rules.iter().map(|r| r.server_type).collect();
        assert_eq!(types, vec![10, 15, 200]);
        assert!(rules[2].endpoints.is_empty());
    }

    #[test]
    fn array_form_allows_several_worlds() {
        let rules = parse_rules_json(
            r#"[{"server_type": 10, "strategy": "round_robin", "endpoints": ["127.0.0.1:1"]},
                {"server_type": 10, "world_id": 7, "strategy": "round_robin", "endpoints": ["127.0.0.1:2"]}]"#,
        )
        .unwrap();
        assert_eq!(rules.len(), 2);
    }

    #[test]
    fn object_key_supplies_a_missing_server_type() {
        let rules = parse_rules_json(r#"{"12": {"strategy": "round_robin", "endpoints": []}}"#).unwrap();
        assert_eq!(rules[0].server_type, 12);
    }

    #[test]
    fn bad_documents_are_rejected_with_reasons() {
        let cases = [
            ("{not json", "invalid JSON"),
            (r#"{"10": {"strategy": "random", "endpoints": []}}"#, "unknown strategy"),
            (r#"{"10": {"strategy": "round_robin", "endpoints": ["nohost"]}}"#, "endpoints"),
            (
                r#"[{"server_type": 10, "strategy": "round_robin"}, {"server_type": 10, "strategy": "round_robin"}]"#,
                "duplicate rule",
            ),
            (r#"{"10": {"server_type": 11, "strategy": "round_robin"}}"#, "does not match"),
            (r#"{"x": {"strategy": "round_robin"}}"#, "not a server type"),
            ("42", "expected an object"),
        ];
        for (doc, want) in cases {
            let errs = parse_rules_json(doc).unwrap_err();
            assert!(errs.iter().any(|e| e.contains(want)), "{doc}: {errs:?}");
        }
    }

    #[test]
    fn realm_mapping_is_validated() {
        let ok = parse_realm_mapping([("7", "127.0.0.1:7007")]).unwrap();
        assert_eq!(ok[0].0, 7);
        assert!(parse_realm_mapping([("x", "127.0.0.1:1")]).is_err());
        assert!(parse_realm_mapping([("7", "nope")]).is_err());
    }

    #[test]
    fn redis_rules_override_static_of_the_same_key_only() {
        let stat = parse_rules_json(
            r#"[{"server_type": 10, "strategy": "round_robin", "endpoints": ["127.0.0.1:1"]},
            {"server_type": 11, "strategy": "round_robin", "endpoints": ["127.0.0.1:1"]}]"#,
        )
        .unwrap();
        let redis = RouteSet {
            rules: parse_rules_json(
                r#"[{"server_type": 10, "strategy": "round_robin", "endpoints": ["127.0.0.1:2"]}]"#,
            )
            .unwrap(),
            realms: vec![],
        };
        let m = merge(&stat, Some(&redis));
        assert_eq!(m.rules.len(), 2);
        assert_eq!(m.rules[0].endpoints[0].addr.port(), 2);
        assert_eq!(m.rules[1].endpoints[0].addr.port(), 1);
        assert_ne!(fingerprint(&m), fingerprint(&merge(&stat, None)));
        assert_eq!(fingerprint(&m), fingerprint(&merge(&stat, Some(&redis))));
    }

    fn set(json: &str) -> RouteSet {
        RouteSet { rules: parse_rules_json(json).unwrap(), realms: vec![] }
    }

    #[test]
    fn fingerprint_is_stable_for_equal_values() {
        let doc = r#"[{"server_type": 10, "service_name": "a", "strategy": "round_robin", "endpoints": ["127.0.0.1:1", "127.0.0.1:2"]},
                      {"server_type": 20, "strategy": "consistent_hash", "endpoints": ["127.0.0.1:3"]}]"#;
        assert_eq!(fingerprint(&set(doc)), fingerprint(&set(doc)));
        // The object form of the same rules, parsed separately, is the same set.
        let object = r#"{"20": {"strategy": "consistent_hash", "endpoints": ["127.0.0.1:3"]},
                         "10": {"service_name": "a", "strategy": "round_robin", "endpoints": ["127.0.0.1:1", "127.0.0.1:2"]}}"#;
        assert_eq!(set(doc), set(object));
        assert_eq!(fingerprint(&set(doc)), fingerprint(&set(object)));
        let with_realm = RouteSet { realms: parse_realm_mapping([("7", "127.0.0.1:7")]).unwrap(), ..set(doc) };
        assert_eq!(fingerprint(&with_realm), fingerprint(&with_realm.clone()));
    }

    #[test]
    fn fingerprint_changes_with_any_value() {
        let base =
            r#"[{"server_type": 10, "service_name": "a", "strategy": "round_robin", "endpoints": ["127.0.0.1:1"]}]"#;
        let fp = fingerprint(&set(base));
        let changed = [
            r#"[{"server_type": 11, "service_name": "a", "strategy": "round_robin", "endpoints": ["127.0.0.1:1"]}]"#,
            r#"[{"server_type": 10, "world_id": 3, "service_name": "a", "strategy": "round_robin", "endpoints": ["127.0.0.1:1"]}]"#,
            r#"[{"server_type": 10, "service_name": "b", "strategy": "round_robin", "endpoints": ["127.0.0.1:1"]}]"#,
            r#"[{"server_type": 10, "service_name": "a", "strategy": "consistent_hash", "endpoints": ["127.0.0.1:1"]}]"#,
            r#"[{"server_type": 10, "service_name": "a", "strategy": "round_robin", "endpoints": ["127.0.0.1:2"]}]"#,
            r#"[{"server_type": 10, "service_name": "a", "strategy": "round_robin", "endpoints": ["127.0.0.1:1", "127.0.0.1:2"]}]"#,
            r#"[{"server_type": 10, "service_name": "a", "strategy": "round_robin", "endpoints": ["127.0.0.1:1"], "hash_key": "session"}]"#,
            r#"[{"server_type": 10, "service_name": "a", "strategy": "round_robin", "endpoints": ["127.0.0.1:1"], "notify_sessions": false}]"#,
            r#"[{"server_type": 10, "service_name": "a", "strategy": "round_robin", "endpoints": ["127.0.0.1:1"], "trace_propagation": true}]"#,
            r#"[{"server_type": 10, "service_name": "a", "strategy": "round_robin", "endpoints": ["127.0.0.1:1"], "on_backend_loss": "rebind"}]"#,
            "[]",
        ];
        for doc in changed {
            assert_ne!(fingerprint(&set(doc)), fp, "{doc}");
        }
        let realm = |ep: &str| RouteSet { realms: parse_realm_mapping([("7", ep)]).unwrap(), ..set(base) };
        assert_ne!(fingerprint(&realm("127.0.0.1:7")), fp, "a realm mapping is a change");
        assert_ne!(fingerprint(&realm("127.0.0.1:7")), fingerprint(&realm("127.0.0.1:8")));
    }

    #[test]
    fn bundle_form() {
        let set = parse_bundle(
            r#"{"rules": [{"server_type": 30, "strategy": "realm_based"}], "realm_mapping": {"7": "127.0.0.1:7007"}}"#,
        )
        .unwrap();
        assert_eq!((set.rules.len(), set.realms.len()), (1, 1));
        assert!(parse_bundle(r#"{"rules": [], "extra": 1}"#).is_err());
        assert_eq!(parse_bundle(ORIGINAL_SAMPLE).unwrap().rules.len(), 3);
    }
}
