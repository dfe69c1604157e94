//! The check list that `restore-drill` and `doctor` print: one line per
//! check, ✓ or ✗ (or skipped, or a warning that does not fail), with the fix.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    /// Could not be checked here; does not fail the run (the detail says why).
    Warn,
    /// Not applicable, or not built yet; does not fail the run.
    Skip,
}

impl Status {
    fn symbol(self) -> &'static str {
        match self {
            Status::Pass => "✓",
            Status::Fail => "✗",
            Status::Warn => "!",
            Status::Skip => "–",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub fn pass(name: &str, detail: impl Into<String>) -> Self {
        Check { name: name.to_owned(), status: Status::Pass, detail: detail.into(), fix: None }
    }

    pub fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        let fix = fix.into();
        Check {
            name: name.to_owned(),
            status: Status::Fail,
            detail: detail.into(),
            fix: (!fix.is_empty()).then_some(fix),
        }
    }

    pub fn warn(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Check { status: Status::Warn, ..Check::fail(name, detail, fix) }
    }

    pub fn skip(name: &str, detail: impl Into<String>) -> Self {
        Check { name: name.to_owned(), status: Status::Skip, detail: detail.into(), fix: None }
    }
}

/// The checks of one run, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Checks(pub Vec<Check>);

impl Checks {
    pub fn push(&mut self, check: Check) {
        self.0.push(check);
    }

    pub fn ok(&self) -> bool {
        !self.0.iter().any(|c| c.status == Status::Fail)
    }

    pub fn count(&self, status: Status) -> usize {
        self.0.iter().filter(|c| c.status == status).count()
    }

    pub fn get(&self, name: &str) -> Option<&Check> {
        self.0.iter().find(|c| c.name == name)
    }

    /// "8 passed, 1 failed (checksum), 1 skipped"
    pub fn summary(&self) -> String {
        let failed: Vec<&str> =
            self.0.iter().filter(|c| c.status == Status::Fail).map(|c| c.name.as_str()).collect();
        let mut parts = vec![format!("{} passed", self.count(Status::Pass))];
        if !failed.is_empty() {
            parts.push(format!("{} failed ({})", failed.len(), failed.join(", ")));
        }
        for (status, word) in [(Status::Warn, "warning(s)"), (Status::Skip, "skipped")] {
            if self.count(status) > 0 {
                parts.push(format!("{} {word}", self.count(status)));
            }
        }
        parts.join(", ")
    }
}

impl fmt::Display for Checks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.0.iter().map(|c| c.name.chars().count()).max().unwrap_or(0);
        for c in &self.0 {
            writeln!(f, "{} {:<width$}  {}", c.status.symbol(), c.name, c.detail)?;
            if let Some(fix) = &c.fix {
                writeln!(f, "  {:<width$}  fix: {fix}", "")?;
            }
        }
        Ok(())
    }
}
