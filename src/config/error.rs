//! Config errors: every problem located as `file:line: key: reason`.

/// One config problem, located.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {key}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub key: String,
    pub reason: String,
}

/// Every problem found in one config file, one per line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", lines(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

fn lines(errs: &[ConfigError]) -> String {
    errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}
