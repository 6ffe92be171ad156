//! Route data from outside the config file: the Redis JSON forms and the
//! realm mapping, parsed and validated into rules (pure, except that host
//! names go to the [`Resolve`] the caller passes).
//!
//! Accepted rule documents (the value of `{prefix}routing:rules`):
//! - the original gateway's object keyed by server type:
//!   `{"10": {"server_type": 10, "service_name": "account", ...}, ...}`
//!   (`server_type` may be left out; the key supplies it);
//! - a JSON array of rules (several worlds per server type);
//! - for files handled by `game-gateway routes ...`, also a bundle
//!   `{"rules": <either form>, "realm_mapping": {"7": "host:port"}}`.
//!
//! An error (bad JSON, bad value, malformed address, duplicate key) rejects
//! the whole document: every reason is returned. Two things are warnings, as
//! the Go gateway's users expect of their data: a rule field this gateway
//! does not know (dropped; a field spelled in another case, `"Strategy"`, is
//! read as its lower-case self) and, with [`Resolution::Deferred`], a host
//! name that does not resolve (left out of its rule until it does, see
//! [`RouteSet::pending`]).

use crate::routing::{Endpoint, EndpointError, RawRule, Resolution, Resolve, RouteRule};
use serde_json::Value;
use std::sync::Arc;

/// Where an endpoint name that did not resolve belongs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    /// The rule (server type, world).
    Rule(u8, u16),
    /// The realm mapping entry of this realm.
    Realm(u16),
}

/// An endpoint name left out of its rule or realm entry because it did not
/// resolve; the control loop retries it and puts it in once it does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pending {
    pub slot: Slot,
    pub name: Arc<str>,
}

/// Rules and realm mapping from one source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RouteSet {
    pub rules: Vec<RouteRule>,
    pub realms: Vec<(u16, Endpoint)>,
    /// Names that did not resolve when the data was read (not in `rules` /
    /// `realms` until they do).
    pub pending: Vec<Pending>,
    /// Problems that did not reject the data (unknown fields, names that do
    /// not resolve), `where: what` like the errors.
    pub warnings: Vec<String>,
}

impl RouteSet {
    /// Whether the rule with `key` lists any endpoint, resolved or not.
    pub fn lists_endpoints(&self, rule: &RouteRule) -> bool {
        !rule.endpoints.is_empty() || self.pending.iter().any(|p| p.slot == Slot::Rule(rule.server_type, rule.world_id))
    }
}

/// The state of one parse: how names resolve, what went wrong.
pub struct Parser<'r> {
    resolver: &'r mut dyn Resolve,
    resolution: Resolution,
    errs: Vec<String>,
    warnings: Vec<String>,
    pending: Vec<Pending>,
}

impl<'r> Parser<'r> {
    pub fn new(resolver: &'r mut dyn Resolve, resolution: Resolution) -> Parser<'r> {
        Parser { resolver, resolution, errs: vec![], warnings: vec![], pending: vec![] }
    }

    /// The set, or every error when there was one.
    fn finish(mut self, rules: Vec<RouteRule>, mut realms: Vec<(u16, Endpoint)>) -> Result<RouteSet, Vec<String>> {
        if !self.errs.is_empty() {
            return Err(self.errs);
        }
        realms.sort_by_key(|(r, _)| *r);
        self.pending.sort_by(|a, b| (&a.slot, &a.name).cmp(&(&b.slot, &b.name)));
        Ok(RouteSet { rules, realms, pending: self.pending, warnings: self.warnings })
    }

    /// Unknown keys of a rule object are dropped with a warning; a key that
    /// differs from a known one only in case is read as that one.
    fn lenient_fields(&mut self, o: &mut serde_json::Map<String, Value>, at: &str) {
        let keys: Vec<String> = o.keys().filter(|k| !RawRule::FIELDS.contains(&k.as_str())).cloned().collect();
        for k in keys {
            let v = o.remove(&k).expect("listed above");
            match RawRule::FIELDS.iter().find(|f| f.eq_ignore_ascii_case(&k)) {
                Some(f) if !o.contains_key(*f) => {
                    self.warnings.push(format!("{at}: field {k:?} read as {f:?}"));
                    o.insert(f.to_string(), v);
                }
                _ => self.warnings.push(format!("{at}: unknown field {k:?} ignored")),
            }
        }
    }

    fn rule(&mut self, mut v: Value, at: &str) -> Option<RouteRule> {
        if let Value::Object(o) = &mut v {
            self.lenient_fields(o, at);
        }
        let raw: RawRule = match serde_json::from_value(v) {
            Ok(r) => r,
            Err(e) => {
                self.errs.push(format!("{at}: {e}"));
                return None;
            }
        };
        match raw.validate_with(self.resolver, self.resolution) {
            Ok(valid) => {
                let key = valid.rule.key();
                for (name, reason) in valid.unresolved {
                    self.warnings.push(format!("{at}.endpoints: {reason}; left out until it resolves"));
                    self.pending.push(Pending { slot: Slot::Rule(key.0, key.1), name });
                }
                Some(valid.rule)
            }
            Err(list) => {
                for (field, reason) in list {
                    self.errs.push(format!("{at}.{field}: {reason}"));
                }
                None
            }
        }
    }

    /// A rules document (object keyed by server type, or array).
    fn rules(&mut self, v: Value) -> Vec<RouteRule> {
        let mut rules = Vec::new();
        match v {
            Value::Array(items) => {
                for (i, item) in items.into_iter().enumerate() {
                    if let Some(r) = self.rule(item, &format!("rules[{i}]")) {
                        rules.push(r);
                    }
                }
            }
            Value::Object(map) => {
                for (k, mut item) in map {
                    let at = format!("rules[{k:?}]");
                    let Ok(key_type) = k.parse::<u8>() else {
                        self.errs.push(format!("{at}: key is not a server type 0..=255"));
                        continue;
                    };
                    if let Value::Object(o) = &mut item {
                        self.lenient_fields(o, &at);
                        match o.get("server_type").and_then(Value::as_i64) {
                            None if !o.contains_key("server_type") => {
                                o.insert("server_type".into(), Value::from(key_type));
                            }
                            Some(t) if t == key_type as i64 => {}
                            _ => {
                                self.errs.push(format!("{at}.server_type: does not match its key {k}"));
                                continue;
                            }
                        }
                    }
                    if let Some(r) = self.rule(item, &at) {
                        rules.push(r);
                    }
                }
            }
            other => self
                .errs
                .push(format!("rules: expected an object keyed by server type or an array, found {}", kind(&other))),
        }
        let mut seen = ahash::AHashSet::new();
        for r in &rules {
            if !seen.insert(r.key()) {
                self.errs.push(format!("duplicate rule for server_type {} world_id {}", r.server_type, r.world_id));
            }
        }
        rules.sort_by_key(|r| r.key());
        rules
    }

    /// Realm id -> `host:port` pairs (the `{prefix}realm:mapping` hash).
    fn realms<'a>(&mut self, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<(u16, Endpoint)> {
        let mut out = Vec::new();
        // One key per realm: `"7"`, `"07"` and `" 7"` all name realm 7. The
        // canonical spelling wins, else the first key in byte order, so the
        // choice never depends on the order Redis lists a hash in.
        let mut pairs: Vec<(&str, &str)> = pairs.into_iter().collect();
        pairs.sort_by(|a, b| {
            let canon = |k: &str| k.trim().parse::<u16>().map_or(true, |r| r.to_string() != k);
            (canon(a.0), a.0).cmp(&(canon(b.0), b.0))
        });
        let mut seen: ahash::AHashMap<u16, &str> = ahash::AHashMap::new();
        for (k, v) in pairs {
            let realm = match k.trim().parse::<u16>() {
                Ok(r) if r <= 32767 => r,
                _ => {
                    self.errs.push(format!("realm_mapping[{k:?}]: realm id is not 0..=32767"));
                    continue;
                }
            };
            if let Some(first) = seen.get(&realm) {
                self.warnings.push(format!("realm_mapping[{k:?}]: realm {realm} is also listed as {first:?}; ignored"));
                continue;
            }
            seen.insert(realm, k);
            match Endpoint::parse_with(v.trim(), self.resolver) {
                Ok(e) => out.push((realm, e)),
                Err(EndpointError::Unresolved(r)) if self.resolution == Resolution::Deferred => {
                    self.warnings.push(format!("realm_mapping[{k:?}]: {r}; left out until it resolves"));
                    self.pending.push(Pending { slot: Slot::Realm(realm), name: Arc::from(v.trim()) });
                }
                Err(e) => self.errs.push(format!("realm_mapping[{k:?}]: {e}")),
            }
        }
        out
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

/// Parses what Redis holds: the rules JSON text (`None` when the key is not
/// set: no Redis rules) and the realm hash pairs.
pub fn parse_redis(
    rules: Option<&str>,
    realms: &[(String, String)],
    resolver: &mut dyn Resolve,
    resolution: Resolution,
) -> Result<RouteSet, Vec<String>> {
    let mut p = Parser::new(resolver, resolution);
    let rules = match rules.map(serde_json::from_str::<Value>) {
        None => vec![],
        Some(Ok(v)) => p.rules(v),
        Some(Err(e)) => {
            p.errs.push(format!("rules: invalid JSON: {e}"));
            vec![]
        }
    };
    let realms = p.realms(realms.iter().map(|(a, b)| (a.as_str(), b.as_str())));
    p.finish(rules, realms)
}

/// Parses a rules file: a bundle with `rules` / `realm_mapping`, or a plain
/// rules document. The bundle is this gateway's own format, so an unknown
/// key at its top level is an error (a misspelt `realm_mapping` would
/// otherwise be lost without a trace).
pub fn parse_bundle(text: &str, resolver: &mut dyn Resolve, resolution: Resolution) -> Result<RouteSet, Vec<String>> {
    let v: Value = serde_json::from_str(text).map_err(|e| vec![format!("invalid JSON: {e}")])?;
    let mut p = Parser::new(resolver, resolution);
    let is_bundle = matches!(&v, Value::Object(o) if o.contains_key("rules") || o.contains_key("realm_mapping"));
    if !is_bundle {
        let rules = p.rules(v);
        return p.finish(rules, vec![]);
    }
    let Value::Object(mut o) = v else { unreachable!() };
    let rules = match o.remove("rules") {
        Some(r) => p.rules(r),
        None => vec![],
    };
    let realms = match o.remove("realm_mapping") {
        Some(Value::Object(m)) => {
            let pairs: Vec<(String, String)> =
                m.into_iter().map(|(k, v)| (k, v.as_str().unwrap_or("").to_string())).collect();
            p.realms(pairs.iter().map(|(a, b)| (a.as_str(), b.as_str())))
        }
        Some(other) => {
            p.errs.push(format!("realm_mapping: expected an object, found {}", kind(&other)));
            vec![]
        }
        None => vec![],
    };
    for k in o.keys() {
        p.errs.push(format!("{k}: unknown key (expected rules, realm_mapping)"));
    }
    p.finish(rules, realms)
}

/// Static rules overlaid with Redis rules: a Redis rule replaces the static
/// rule of the same (server type, world); static rules Redis lacks remain.
/// Redis names still waiting to resolve come along.
pub(crate) fn merge(static_rules: &[RouteRule], redis: Option<&RouteSet>) -> RouteSet {
    let mut by_key: std::collections::BTreeMap<(u8, u16), RouteRule> =
        static_rules.iter().map(|r| (r.key(), r.clone())).collect();
    let mut set = RouteSet::default();
    if let Some(redis) = redis {
        for r in &redis.rules {
            by_key.insert(r.key(), r.clone());
        }
        set.realms = redis.realms.clone();
        set.pending = redis.pending.clone();
    }
    set.rules = by_key.into_values().collect();
    set
}

/// A fingerprint of what a snapshot would hold (every field of every rule,
/// the realm mapping), to publish snapshots only on change. Stable within a
/// process, which is all the comparison with the last published set needs.
pub(crate) fn fingerprint(set: &RouteSet) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    set.rules.hash(&mut h);
    set.realms.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::SystemResolver;

    fn parse_rules_json(text: &str) -> Result<Vec<RouteRule>, Vec<String>> {
        parse_redis(Some(text), &[], &mut SystemResolver, Resolution::Required).map(|s| s.rules)
    }

    fn parse_realm_mapping<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Vec<(u16, Endpoint)>, Vec<String>> {
        let pairs: Vec<(String, String)> = pairs.into_iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        parse_redis(None, &pairs, &mut SystemResolver, Resolution::Required).map(|s| s.realms)
    }

    fn bundle(text: &str) -> Result<RouteSet, Vec<String>> {
        parse_bundle(text, &mut SystemResolver, Resolution::Required)
    }

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
            ..Default::default()
        };
        let m = merge(&stat, Some(&redis));
        assert_eq!(m.rules.len(), 2);
        assert_eq!(m.rules[0].endpoints[0].addr.port(), 2);
        assert_eq!(m.rules[1].endpoints[0].addr.port(), 1);
        assert_ne!(fingerprint(&m), fingerprint(&merge(&stat, None)));
        assert_eq!(fingerprint(&m), fingerprint(&merge(&stat, Some(&redis))));
    }

    fn set(json: &str) -> RouteSet {
        RouteSet { rules: parse_rules_json(json).unwrap(), ..Default::default() }
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

    /// A resolver for which no name resolves (the machine running
    /// `routes check` is outside the cluster).
    struct NoDns;
    impl Resolve for NoDns {
        fn resolve(&mut self, host: &str, _: u16) -> Result<std::net::SocketAddr, String> {
            Err(format!("{host}: Name or service not known"))
        }
    }

    #[test]
    fn a_realm_listed_under_two_keys_keeps_the_canonical_one_whatever_the_order() {
        let pairs = |order: &[usize]| -> Vec<(String, String)> {
            let all = [("07", "127.0.0.1:1"), ("7", "127.0.0.1:2"), (" 7", "127.0.0.1:3"), ("8", "127.0.0.1:4")];
            order.iter().map(|&i| (all[i].0.to_string(), all[i].1.to_string())).collect()
        };
        for order in [[0, 1, 2, 3], [2, 3, 1, 0], [3, 0, 2, 1]] {
            let set = parse_redis(None, &pairs(&order), &mut NoDns, Resolution::Required).unwrap();
            let got: Vec<(u16, String)> = set.realms.iter().map(|(r, e)| (*r, e.addr.to_string())).collect();
            assert_eq!(got, [(7, "127.0.0.1:2".to_string()), (8, "127.0.0.1:4".to_string())], "{order:?}");
            assert_eq!(set.warnings.len(), 2, "{:?}", set.warnings);
            assert!(set.warnings.iter().all(|w| w.contains("realm 7 is also listed as \"7\"")), "{:?}", set.warnings);
        }
        // With no canonical key, the first in byte order.
        let set = parse_redis(None, &pairs(&[2, 0]), &mut NoDns, Resolution::Required).unwrap();
        assert_eq!(set.realms[0].1.addr.to_string(), "127.0.0.1:3");
    }

    #[test]
    fn unknown_rule_fields_are_warnings_not_errors_in_json() {
        let doc = r#"{"10": {"server_type": 10, "strategy": "round_robin", "endpoints": ["127.0.0.1:1"], "weight": 2, "Hash_Key": "session"},
                      "11": {"Server_Type": 11, "strategy": "round_robin", "endpoints": [], "tags": ["x"]}}"#;
        let set = parse_redis(Some(doc), &[], &mut NoDns, Resolution::Deferred).unwrap();
        assert_eq!(set.rules.len(), 2);
        assert_eq!(set.rules[0].hash_key, crate::routing::HashKey::Session, "read case-insensitively, as Go does");
        assert_eq!(
            set.warnings,
            vec![
                r#"rules["10"]: field "Hash_Key" read as "hash_key""#,
                r#"rules["10"]: unknown field "weight" ignored"#,
                r#"rules["11"]: field "Server_Type" read as "server_type""#,
                r#"rules["11"]: unknown field "tags" ignored"#,
            ]
        );
        // An array rule too; a real error still rejects the document.
        let arr = r#"[{"server_type": 10, "strategy": "round_robin", "priority": 1}]"#;
        assert_eq!(parse_redis(Some(arr), &[], &mut NoDns, Resolution::Required).unwrap().warnings.len(), 1);
        let bad = r#"[{"server_type": 10, "strategy": "nope", "priority": 1}]"#;
        assert!(parse_redis(Some(bad), &[], &mut NoDns, Resolution::Deferred).is_err());
        // Both spellings present: the exact one wins, the other is unknown.
        let both = r#"[{"server_type": 10, "strategy": "round_robin", "Strategy": "x"}]"#;
        let set = parse_redis(Some(both), &[], &mut NoDns, Resolution::Deferred).unwrap();
        assert_eq!(set.warnings, vec![r#"rules[0]: unknown field "Strategy" ignored"#]);
    }

    #[test]
    fn names_that_do_not_resolve_wait_unless_required() {
        let doc = r#"[{"server_type": 10, "strategy": "round_robin", "endpoints": ["a.invalid:1", "127.0.0.1:2"]}]"#;
        let realms = vec![("7".to_string(), "b.invalid:3".to_string())];
        let set = parse_redis(Some(doc), &realms, &mut NoDns, Resolution::Deferred).unwrap();
        assert_eq!(set.rules[0].endpoints.len(), 1, "the literal stays, the name waits");
        assert!(set.realms.is_empty());
        assert_eq!(
            set.pending,
            vec![
                Pending { slot: Slot::Rule(10, 0), name: "a.invalid:1".into() },
                Pending { slot: Slot::Realm(7), name: "b.invalid:3".into() },
            ]
        );
        assert!(set
            .warnings
            .iter()
            .all(|w| w.contains("does not resolve") && w.ends_with("left out until it resolves")));
        assert!(set.lists_endpoints(&set.rules[0]));
        let errs = parse_redis(Some(doc), &realms, &mut NoDns, Resolution::Required).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with("rules[0].endpoints: \"a.invalid:1\" does not resolve"), "{errs:?}");
        // Malformed is malformed whatever DNS says.
        for bad in [r#"["nohost"]"#, r#"["a.invalid:0"]"#, r#"["a b:1"]"#, r#"["a.invalid:99999"]"#] {
            let doc = format!(r#"[{{"server_type": 10, "strategy": "round_robin", "endpoints": {bad}}}]"#);
            assert!(parse_redis(Some(&doc), &[], &mut NoDns, Resolution::Deferred).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_go_gateways_example_route_data_loads() {
        // As its init job stores it: `redis-cli -x SET` keeps the file's newline.
        let text = include_str!("../../examples/routes/seed-example.json");
        assert!(text.ends_with('\n'));
        let set = parse_bundle(text, &mut NoDns, Resolution::Deferred).unwrap();
        let keys: Vec<(u8, u16)> = set.rules.iter().map(|r| r.key()).collect();
        assert_eq!(keys, vec![(10, 0), (15, 0), (200, 1)]);
        assert_eq!(set.pending.len(), 2, "the two cluster-local names wait for DNS");
        assert!(!set.lists_endpoints(&set.rules[2]), "type 200 waits for Consul");
        assert_eq!(set.warnings.len(), 2);
        assert!(parse_bundle(text, &mut NoDns, Resolution::Required).is_err());
        let redis = parse_redis(Some(text), &[], &mut NoDns, Resolution::Deferred).unwrap();
        assert_eq!(redis.rules, set.rules);
    }

    #[test]
    fn bundle_form() {
        let set = bundle(
            r#"{"rules": [{"server_type": 30, "strategy": "realm_based"}], "realm_mapping": {"7": "127.0.0.1:7007"}}"#,
        )
        .unwrap();
        assert_eq!((set.rules.len(), set.realms.len()), (1, 1));
        assert!(bundle(r#"{"rules": [], "extra": 1}"#).is_err(), "the bundle's own keys stay strict");
        assert_eq!(bundle(ORIGINAL_SAMPLE).unwrap().rules.len(), 3);
    }
}
