//! Config reload (SIGHUP or a changed file): the new file is validated whole;
//! reloadable keys and static routes apply live, restart-only keys are
//! reported and keep their running value.

use super::logging::set_log_level;
use super::{unix_now, Control};
use crate::config::Config;
use crate::state::ErrorSource;
use crate::worker::WorkerCommand;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Keys that only take effect on restart, as "key (running -> new)", each
/// value spelled as in the config.
pub(crate) fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let (o, n) = (&old.server, &new.server);
    let mut v = Vec::new();
    let mut check = |key: &str, a: String, b: String| {
        if a != b {
            v.push(format!("{key} ({a} -> {b})"));
        }
    };
    check("server.listen", o.listen.to_string(), n.listen.to_string());
    check("server.admin_listen", o.admin_listen.to_string(), n.admin_listen.to_string());
    check("server.workers", o.workers.to_string(), n.workers.to_string());
    check("server.cpus", format!("{:?}", o.cpus), format!("{:?}", n.cpus));
    check("server.io_driver", o.io_driver.to_string(), n.io_driver.to_string());
    check("server.node_id", o.node_id.to_string(), n.node_id.to_string());
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map_or("off".to_string(), |p| p.display().to_string());
    check("server.upgrade_socket", path(&o.upgrade_socket), path(&n.upgrade_socket));
    let after = |wait: bool| if wait { "wait" } else { "exit" }.to_string();
    check("server.after_handover", after(o.wait_after_handover), after(n.wait_after_handover));
    check("server.upgrade_peer_exe", path(&o.upgrade_peer_exe), path(&n.upgrade_peer_exe));
    check(
        "limits.overload_queued_bytes",
        old.limits.overload_queued_bytes.to_string(),
        new.limits.overload_queued_bytes.to_string(),
    );
    let redis =
        |c: &Config| c.redis.as_ref().map(|r| format!("{} {}", r.url, r.key_prefix)).unwrap_or_else(|| "off".into());
    check("redis", redis(old), redis(new));
    // Every [consul] key: a watcher per service is started with them.
    let consul = |c: &Config| match &c.consul {
        Some(k) => format!(
            "{} {:?} namespace={:?} dc={:?} token={} wait={:?}",
            k.address,
            k.services,
            k.namespace,
            k.datacenter,
            if k.token.is_some() { "set" } else { "none" },
            k.wait
        ),
        None => "off".into(),
    };
    let token_only =
        old.consul.as_ref().map(|c| &c.token) != new.consul.as_ref().map(|c| &c.token) && consul(old) == consul(new);
    check("consul", consul(old), consul(new));
    check("log.format", old.log.format.to_string(), new.log.format.to_string());
    check("log.service_name", old.log.service_name.clone(), new.log.service_name.clone());
    check("log.service_namespace", old.log.service_namespace.clone(), new.log.service_namespace.clone());
    if token_only {
        v.push("consul.token (changed; not shown)".to_string());
    }
    v
}

impl Control {
    /// Re-reads the config file; rejects it whole when invalid.
    pub(super) fn reload(&mut self) {
        let origin = std::time::Instant::now();
        let stats = self.stats.clone();
        // The version read now is the one the file watch has seen: a rewrite
        // followed by SIGHUP is one reload, not two.
        self.mtime = super::mtime(&self.path);
        match Config::load(&self.path, &self.env) {
            Err(errs) => {
                stats.config_reload_errors.fetch_add(1, Ordering::Relaxed);
                for e in &errs.0 {
                    tracing::error!(error = %e, "config reload rejected; the running config stays");
                }
                stats.set_error(ErrorSource::Config, errs.to_string(), unix_now());
            }
            Ok(new) if new.admin.token.is_none() && !self.running.server.admin_listen.ip().is_loopback() => {
                // admin_listen needs a restart, so the running port stays off
                // loopback: the file may not drop the token it needs.
                stats.config_reload_errors.fetch_add(1, Ordering::Relaxed);
                let e = format!(
                    "{}: admin.token_file: not set, but the running admin port {} is not loopback (admin_listen needs a restart)",
                    new.source, self.running.server.admin_listen
                );
                tracing::error!(error = %e, "config reload rejected; the running config stays");
                stats.set_error(ErrorSource::Config, e, unix_now());
            }
            Ok(mut new) => {
                for k in needs_restart(&self.running, &new) {
                    tracing::warn!(key = %k, "config change needs a restart; keeping the running value");
                }
                new.server = self.running.server.clone();
                new.redis = self.running.redis.clone();
                new.consul = self.running.consul.clone();
                new.log.format = self.running.log.format;
                // max_connections is live: fit it to the open-file limit again
                // (the new routes may add backend connections).
                if let Some(mut b) = crate::gateway::fit_fd_limit(&new, true) {
                    new.limits.max_connections = b.effective_max_connections;
                    let mut held = stats.fd_budget.lock().unwrap();
                    // Raised at start: say so still.
                    b.raised_from = b.raised_from.or(held.and_then(|h| h.raised_from));
                    // Warn again only when the outcome changed, not on every
                    // reload.
                    if held.is_none_or(|h| {
                        (h.configured_max_connections, h.effective_max_connections, h.soft)
                            != (b.configured_max_connections, b.effective_max_connections, b.soft)
                    }) {
                        crate::gateway::report_fd_fit(&b);
                    }
                    *held = Some(b);
                }
                new.log.service_name = self.running.log.service_name.clone();
                new.log.service_namespace = self.running.log.service_namespace.clone();
                if new.log.level != self.running.log.level {
                    set_log_level(&new.log.level);
                }
                *stats.admin_token.lock().unwrap() = new.admin.token.clone();
                self.token_mtime = new.admin.token_file.as_deref().and_then(super::mtime);
                let new = Arc::new(new);
                let c = new.clone();
                self.gw.broadcast(move || WorkerCommand::Config(c.clone()));
                self.running = new;
                stats.config_reloads.fetch_add(1, Ordering::Relaxed);
                stats.config_loaded_at.store(unix_now(), Ordering::Relaxed);
                tracing::info!(source = %self.running.source, "config reloaded");
                if stats.clear_error(ErrorSource::Config, unix_now()) {
                    tracing::info!("config reloaded: the last config error is cleared");
                }
                self.publish("config reload", origin);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_only_keys_are_reported_as_spelled_in_the_config() {
        let old = Config::from_str("[server]\nio_driver = \"auto\"\n[log]\nformat = \"json\"\n", "a.toml").unwrap();
        let new = Config::from_str("[server]\nio_driver = \"epoll\"\n[log]\nformat = \"text\"\n", "b.toml").unwrap();
        assert_eq!(needs_restart(&old, &new), vec!["server.io_driver (auto -> epoll)", "log.format (json -> text)"]);
        assert!(needs_restart(&old, &old).is_empty());
    }

    #[test]
    fn consul_changes_need_a_restart_and_the_token_is_not_shown() {
        let off = Config::from_str("", "a.toml").unwrap();
        let on = |extra: &str| {
            Config::from_str(&format!("[consul]\nservices = {{ 200 = \"game\" }}\n{extra}"), "b.toml").unwrap()
        };
        let changed = needs_restart(&off, &on(""));
        assert_eq!(changed.len(), 1);
        assert!(changed[0].starts_with("consul (off -> 127.0.0.1:8500 {200: \"game\"}"), "{changed:?}");
        let token = needs_restart(&on("token = \"one\"\n"), &on("token = \"two\"\n"));
        assert_eq!(token, vec!["consul.token (changed; not shown)"]);
        assert!(needs_restart(&on("wait = \"10s\"\n"), &on("wait = \"20s\"\n"))[0].starts_with("consul ("));
    }
}
