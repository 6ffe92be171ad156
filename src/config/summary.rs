//! The `--check-config` summary: what a file resolves to, every value spelled
//! the way the config file spells it (`io_driver=io_uring`, `format=json`,
//! durations in `ms`/`s`), so the output can be compared with the file.

use super::sections::Config;
use std::fmt::{self, Write};
use std::time::Duration;

/// A duration as the config spells it: whole seconds as `5s`, else `250ms`
/// (both parse back to the same value).
pub(crate) struct Spelled(pub(crate) Duration);

impl fmt::Display for Spelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            write!(f, "{}s", d.as_secs())
        } else {
            write!(f, "{}ms", d.as_millis())
        }
    }
}

impl Config {
    /// A human summary for `--check-config`.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = self.write_summary(&mut s);
        s
    }

    fn write_summary(&self, s: &mut String) -> fmt::Result {
        writeln!(s, "config: {}", self.source)?;
        let v = &self.server;
        writeln!(
            s,
            "server: listen={} admin_listen={} node_id={} workers={} cpus={:?} cpu_set={} io_driver={} drain_timeout={}",
            v.listen,
            v.admin_listen,
            v.node_id,
            v.workers,
            v.cpus,
            v.cpu_budget.set,
            v.io_driver,
            Spelled(v.drain_timeout)
        )?;
        if let Some(p) = &v.upgrade_socket {
            let after = if v.wait_after_handover { "wait" } else { "exit" };
            writeln!(s, "upgrade: socket={} after_handover={after}", p.display())?;
        }
        let l = &self.limits;
        writeln!(
            s,
            "limits: max_connections={} per_ip={} rate_per_ip={}/s max_message_size={} messages_per_second={} messages_burst={} on_rate_limit={} handshake_timeout={} idle_timeout={}",
            l.max_connections,
            l.max_connections_per_ip,
            l.connection_rate_per_ip,
            l.max_message_size,
            l.messages_per_second,
            l.messages_burst,
            l.on_rate_limit,
            Spelled(l.handshake_timeout),
            Spelled(l.idle_timeout)
        )?;
        let b = &self.backend;
        writeln!(
            s,
            "backend: connections_per_endpoint={} dial_timeout={} max_frame_size={} backoff={}..{}",
            b.connections_per_endpoint,
            Spelled(b.dial_timeout),
            b.max_frame_size,
            Spelled(b.reconnect_backoff_min),
            Spelled(b.reconnect_backoff_max)
        )?;
        match &self.redis {
            Some(r) => writeln!(
                s,
                "redis: url={} key_prefix={} refresh_interval={}",
                r.url,
                r.key_prefix,
                Spelled(r.refresh_interval)
            )?,
            None => writeln!(s, "redis: off (static routes only)")?,
        }
        match &self.consul {
            Some(c) => writeln!(
                s,
                "consul: address=http://{} services={} namespace={} datacenter={} token={} wait={}",
                c.address,
                c.services.iter().map(|(t, n)| format!("{t}={n}")).collect::<Vec<_>>().join(","),
                if c.namespace.is_empty() { "*" } else { &c.namespace },
                c.datacenter.as_deref().unwrap_or("(agent's)"),
                if c.token.is_some() { "set" } else { "none" },
                Spelled(c.wait)
            )?,
            None => writeln!(s, "consul: off")?,
        }
        writeln!(s, "names: resolve_interval={}", Spelled(self.backend.resolve_interval))?;
        writeln!(s, "routes: {}", self.routes.len())?;
        for r in &self.routes {
            writeln!(s, "  {r}")?;
        }
        write!(s, "log: level={} format={} access_log={}", self.log.level, self.log.format, self.log.access_log)?;
        if self.log.format == super::LogFormat::Otel {
            write!(s, " service.name={:?} service.namespace={:?}", self.log.service_name, self.log.service_namespace)?;
        }
        writeln!(s)?;
        match (&self.admin.token_file, &self.admin.token) {
            (Some(f), Some(t)) => writeln!(
                s,
                "admin: token_file={} (a {}-byte token: POST /drain needs Authorization: Bearer)",
                f.display(),
                t.len()
            ),
            _ => writeln!(s, "admin: no token (admin_listen is loopback; POST /drain is open to local callers)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Environment;

    #[test]
    fn durations_are_spelled_as_in_the_file() {
        assert_eq!(Spelled(Duration::from_secs(30)).to_string(), "30s");
        assert_eq!(Spelled(Duration::from_millis(1500)).to_string(), "1500ms");
        assert_eq!(Spelled(Duration::from_millis(100)).to_string(), "100ms");
    }

    #[test]
    fn summary_spells_values_as_the_config_does() {
        let src = "[server]\nio_driver = \"io_uring\"\ndrain_timeout = \"1500ms\"\n\n[limits]\non_rate_limit = \"close\"\nmessages_per_second = 5\n\n[log]\nformat = \"text\"\n\n[[routes]]\nserver_type = 10\nstrategy = \"consistent_hash\"\nendpoints = [\"127.0.0.1:1\"]\nhash_key = \"client_ip\"\non_backend_loss = \"rebind\"\n";
        let s = Config::from_str_env(src, "s.toml", &Environment::default()).unwrap().summary();
        for want in [
            "io_driver=io_uring ",
            "drain_timeout=1500ms",
            "on_rate_limit=close ",
            "idle_timeout=120s",
            "format=text ",
            "strategy=consistent_hash ",
            "hash_key=client_ip ",
            "on_backend_loss=rebind",
        ] {
            assert!(s.contains(want), "{want:?} missing in\n{s}");
        }
        let defaults = Config::from_str(crate::config::EMBEDDED_DEFAULT, "<embedded>").unwrap().summary();
        for want in
            ["io_driver=auto ", "on_rate_limit=drop ", "format=json ", "strategy=round_robin ", "on_backend_loss=close"]
        {
            assert!(defaults.contains(want), "{want:?} missing in\n{defaults}");
        }
        // No Debug spelling anywhere.
        for debug in ["IoUring", "Close", "Rebind", "Json", "Text", "RoundRobin", "ConsistentHash", "ClientIp"] {
            assert!(!s.contains(debug) && !defaults.contains(debug), "{debug} in\n{s}\n{defaults}");
        }
    }
}
