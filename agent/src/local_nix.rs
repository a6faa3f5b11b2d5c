//! What the local Nix builds for: `system`, `extra-platforms` and
//! `system-features` from `nix show-config --json`, read once at startup
//! unless the configuration names them.

use serde_json::Value;
use tokio::process::Command;

/// Systems and features to advertise.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Platform {
    /// `system` first, then `extra-platforms`.
    pub systems: Vec<String>,
    pub features: Vec<String>,
}

/// Runs `nix --extra-experimental-features nix-command show-config --json`.
pub async fn query() -> Result<Platform, String> {
    let output = Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "show-config",
            "--json",
        ])
        .env_remove("NIX_REMOTE")
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run `nix show-config`: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "`nix show-config` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    parse_show_config(&output.stdout)
}

/// The platform from `show-config --json` output. Each setting is an object
/// with a `value` (Nix ≥ 2.4) or the bare value (older).
pub fn parse_show_config(json: &[u8]) -> Result<Platform, String> {
    let doc: Value = serde_json::from_slice(json)
        .map_err(|e| format!("`nix show-config --json` printed invalid JSON: {e}"))?;
    let setting = |name: &str| -> Option<&Value> {
        let v = doc.get(name)?;
        Some(v.get("value").unwrap_or(v))
    };
    let strings = |v: Option<&Value>| -> Vec<String> {
        match v {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            // Older Nix prints lists as space-separated strings.
            Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            _ => Vec::new(),
        }
    };
    let system = setting("system")
        .and_then(Value::as_str)
        .ok_or("`nix show-config --json` has no `system`")?
        .to_owned();
    let mut systems = vec![system];
    for extra in strings(setting("extra-platforms")) {
        if !systems.contains(&extra) {
            systems.push(extra);
        }
    }
    Ok(Platform {
        systems,
        features: strings(setting("system-features")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_2_8_format() {
        let json = br#"{"system":{"value":"x86_64-linux","aliases":[]},
            "extra-platforms":{"value":["i686-linux","x86_64-linux"]},
            "system-features":{"value":["benchmark","kvm"]}}"#;
        let p = parse_show_config(json).expect("parses");
        assert_eq!(p.systems, ["x86_64-linux", "i686-linux"]);
        assert_eq!(p.features, ["benchmark", "kvm"]);
    }

    #[test]
    fn bare_values_and_errors() {
        let json = br#"{"system":"aarch64-linux","system-features":"kvm big-parallel"}"#;
        let p = parse_show_config(json).expect("parses");
        assert_eq!(p.systems, ["aarch64-linux"]);
        assert_eq!(p.features, ["kvm", "big-parallel"]);
        assert!(parse_show_config(b"{}").is_err());
        assert!(parse_show_config(b"not json").is_err());
    }
}
