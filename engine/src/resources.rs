//! What a stage asks of the machine or the scheduler: `resources: {cpus, mem, gpus, time,
//! partition}`, per stage or as the pipeline's default. Resources never enter a key: they
//! change where and how fast a stage runs, not what it makes.

use serde_json::{Map, Value};

use crate::diag::{Diagnostic, did_you_mean};
use crate::params;
use crate::pipeline::Pipeline;

const FIELDS: &[&str] = &["cpus", "mem", "gpus", "time", "partition"];

/// A stage's requests; unset fields take the pipeline's `resources`, then the executor's
/// defaults (1 CPU, no memory or time limit, no GPU, the default partition).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpus: Option<u32>,
    /// Megabytes.
    pub mem_mb: Option<u64>,
    pub gpus: Option<u32>,
    /// Slurm's time limit syntax, checked: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`.
    pub time: Option<String>,
    pub partition: Option<String>,
}

impl Resources {
    /// `self` with unset fields taken from `defaults`.
    pub fn or(&self, defaults: &Resources) -> Resources {
        Resources {
            cpus: self.cpus.or(defaults.cpus),
            mem_mb: self.mem_mb.or(defaults.mem_mb),
            gpus: self.gpus.or(defaults.gpus),
            time: self.time.clone().or_else(|| defaults.time.clone()),
            partition: self
                .partition
                .clone()
                .or_else(|| defaults.partition.clone()),
        }
    }

    /// CPUs to budget for: asked for, else 1.
    pub fn cpus_or_one(&self) -> u32 {
        self.cpus.unwrap_or(1).max(1)
    }
}

/// Reads a `resources:` map at `at`; problems go to `errors` with the field's position.
pub(crate) fn check(
    pl: &Pipeline,
    v: Option<&Value>,
    at: &[String],
    errors: &mut Vec<Diagnostic>,
) -> Resources {
    let map: &Map<String, Value> = match v {
        None | Some(Value::Null) => return Resources::default(),
        Some(Value::Object(m)) => m,
        Some(v) => {
            errors.push(pl.diag(
                at,
                false,
                format!(
                    "`resources` must be a map with {}, got {}",
                    FIELDS.join(", "),
                    params::short(v)
                ),
            ));
            return Resources::default();
        }
    };
    let field = |k: &str| {
        let mut p = at.to_vec();
        p.push(k.to_string());
        p
    };
    let mut out = Resources::default();
    for (k, v) in map {
        let problem = match k.as_str() {
            "cpus" => count(v, 1).map(|n| out.cpus = Some(n)),
            "gpus" => count(v, 0).map(|n| out.gpus = Some(n)),
            "mem" => megabytes(v).map(|m| out.mem_mb = Some(m)),
            "time" => time_limit(v).map(|t| out.time = Some(t)),
            "partition" => match v.as_str() {
                Some(s) if !s.is_empty() && !s.contains(char::is_whitespace) => {
                    out.partition = Some(s.to_string());
                    Ok(())
                }
                _ => Err(format!(
                    "`partition` must be a partition name, got {}",
                    params::short(v)
                )),
            },
            other => {
                let hint = match did_you_mean(other, FIELDS) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("expected one of: {}", FIELDS.join(", ")),
                };
                errors.push(pl.diag(
                    &field(other),
                    true,
                    format!("unknown resource `{other}`; {hint}"),
                ));
                continue;
            }
        };
        if let Err(message) = problem {
            errors.push(pl.diag(&field(k), false, message));
        }
    }
    out
}

fn count(v: &Value, min: u64) -> Result<u32, String> {
    match v.as_u64() {
        Some(n) if n >= min && n <= u32::MAX as u64 => Ok(n as u32),
        _ => Err(format!(
            "must be a whole number ≥ {min}, got {}",
            params::short(v)
        )),
    }
}

/// `4G`, `500M`, `1.5G`, `2T` or a number of megabytes.
fn megabytes(v: &Value) -> Result<u64, String> {
    let bad = || {
        format!(
            "`mem` must be a size such as 500M, 4G or a number of megabytes, got {}",
            params::short(v)
        )
    };
    if let Some(n) = v.as_u64() {
        return if n > 0 { Ok(n) } else { Err(bad()) };
    }
    let s = v.as_str().ok_or_else(bad)?.trim();
    let (number, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let factor = match unit.to_ascii_uppercase().trim_end_matches('B') {
        "" | "M" => 1.0,
        "K" => 1.0 / 1024.0,
        "G" => 1024.0,
        "T" => 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    match number.trim().parse::<f64>() {
        Ok(x) if x > 0.0 && x.is_finite() => Ok((x * factor).ceil().max(1.0) as u64),
        _ => Err(bad()),
    }
}

/// Slurm's `--time` forms, kept as written.
fn time_limit(v: &Value) -> Result<String, String> {
    let bad = || {
        format!(
            "`time` must be minutes or MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, got {}",
            params::short(v)
        )
    };
    if let Some(n) = v.as_u64() {
        return if n > 0 { Ok(n.to_string()) } else { Err(bad()) };
    }
    let s = v.as_str().ok_or_else(bad)?.trim();
    let digits = |x: &str| !x.is_empty() && x.len() <= 4 && x.chars().all(|c| c.is_ascii_digit());
    let ok = match s.split_once('-') {
        Some((days, rest)) => {
            digits(days) && {
                let parts: Vec<&str> = rest.split(':').collect();
                (1..=3).contains(&parts.len()) && parts.iter().all(|p| digits(p))
            }
        }
        None => {
            let parts: Vec<&str> = s.split(':').collect();
            (1..=3).contains(&parts.len()) && parts.iter().all(|p| digits(p))
        }
    };
    if ok { Ok(s.to_string()) } else { Err(bad()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_read_as_megabytes() {
        assert_eq!(megabytes(&json!("4G")), Ok(4096));
        assert_eq!(megabytes(&json!("500M")), Ok(500));
        assert_eq!(megabytes(&json!("1.5gb")), Ok(1536));
        assert_eq!(megabytes(&json!(300)), Ok(300));
        assert!(megabytes(&json!("4X")).is_err());
        assert!(megabytes(&json!("-1G")).is_err());
        assert!(megabytes(&json!(0)).is_err());
    }

    #[test]
    fn slurm_time_forms_are_accepted_and_others_refused() {
        for ok in ["30", "10:00", "01:00:00", "1-00", "2-12:30", "1-00:00:00"] {
            assert_eq!(time_limit(&json!(ok)), Ok(ok.to_string()), "{ok}");
        }
        assert_eq!(time_limit(&json!(45)), Ok("45".into()));
        for bad in ["1h", "1:2:3:4", "-5", "", "1-"] {
            assert!(time_limit(&json!(bad)).is_err(), "{bad}");
        }
    }
}
