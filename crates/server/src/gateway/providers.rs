//! `--llm-providers FILE`: the providers the gateway serves, their keys and prices.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

use agentd_core::Usage;
use anyhow::{Context, bail};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvidersFile {
    #[serde(default)]
    provider: Vec<ProviderConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderConfig {
    name: String,
    kind: Kind,
    base_url: String,
    api_key_file: PathBuf,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u64>,
    #[serde(default)]
    prices: BTreeMap<String, Price>,
}

/// Which API a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Chat Completions and Responses.
    Openai,
    /// Messages.
    Anthropic,
}

/// USD per million tokens.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    input: f64,
    output: f64,
    /// Input read from the prompt cache; the input price where not given.
    cached_input: Option<f64>,
}

impl Price {
    /// What `usage` costs, in micro-dollars: a token at X dollars per million costs X
    /// micro-dollars.
    pub fn cost_micros(&self, usage: &Usage) -> u64 {
        let cached = usage.cached_input_tokens.min(usage.input_tokens);
        let fresh = usage.input_tokens - cached;
        let micros = fresh as f64 * self.input
            + cached as f64 * self.cached_input.unwrap_or(self.input)
            + usage.output_tokens as f64 * self.output;
        micros.round() as u64
    }
}

/// One provider, ready to forward to.
#[derive(Debug)]
pub struct Provider {
    pub name: String,
    pub kind: Kind,
    /// Without a trailing `/`: a request for `/NAME/REST` goes to `BASE_URL/REST`.
    pub base_url: String,
    key_file: PathBuf,
    key: RwLock<String>,
    prices: BTreeMap<String, Price>,
    /// Its rate limits, shared by every agent.
    pub limits: super::limits::Limits,
}

impl Provider {
    pub fn key(&self) -> String {
        self.key
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads the key file again (SIGHUP).
    pub fn reload_key(&self) -> anyhow::Result<()> {
        let key = read_key(&self.name, &self.key_file)?;
        *self.key.write().unwrap_or_else(PoisonError::into_inner) = key;
        Ok(())
    }

    /// The price of a model: its own, or that of the longest listed prefix
    /// (`gpt-4.1-mini` prices `gpt-4.1-mini-2025-04-14`).
    pub fn price(&self, model: &str) -> Option<&Price> {
        self.prices.get(model).or_else(|| {
            self.prices
                .iter()
                .filter(|(listed, _)| model.starts_with(listed.as_str()))
                .max_by_key(|(listed, _)| listed.len())
                .map(|(_, price)| price)
        })
    }
}

fn read_key(name: &str, path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "provider `{name}`: reading api_key_file `{}`",
            path.display()
        )
    })?;
    let key = text.trim();
    if key.is_empty() || key.contains(['\r', '\n']) {
        bail!(
            "provider `{name}`: api_key_file `{}` must hold one key on one line",
            path.display()
        );
    }
    Ok(key.to_string())
}

/// Reads and checks the file: every provider named once (letters, digits, `-`, `_`), an
/// `http(s)://` base URL, a readable key, prices that are numbers of dollars.
pub fn load(path: &Path) -> anyhow::Result<Vec<Provider>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --llm-providers `{}`", path.display()))?;
    let file: ProvidersFile =
        toml::from_str(&text).with_context(|| format!("--llm-providers `{}`", path.display()))?;
    if file.provider.is_empty() {
        bail!("--llm-providers `{}` lists no [[provider]]", path.display());
    }
    let mut providers: Vec<Provider> = Vec::new();
    for config in file.provider {
        let name = config.name;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("provider name `{name}`: use letters, digits, `-` and `_` (it is a URL path)");
        }
        if config.requests_per_minute == Some(0) || config.tokens_per_minute == Some(0) {
            bail!(
                "provider `{name}`: a rate limit of 0 would refuse everything: leave it out for none"
            );
        }
        if providers.iter().any(|other| other.name == name) {
            bail!("provider `{name}` is listed twice");
        }
        let base_url = config.base_url.trim_end_matches('/').to_string();
        let uri: hyper::Uri = base_url
            .parse()
            .with_context(|| format!("provider `{name}`: base_url `{base_url}`"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            bail!("provider `{name}`: base_url `{base_url}` must be an http:// or https:// URL");
        }
        for (model, price) in &config.prices {
            let prices = [Some(price.input), Some(price.output), price.cached_input];
            if prices
                .into_iter()
                .flatten()
                .any(|p| !p.is_finite() || p < 0.0)
            {
                bail!("provider `{name}`: the prices of `{model}` must be dollars, 0 or more");
            }
        }
        let key = read_key(&name, &config.api_key_file)?;
        providers.push(Provider {
            name,
            kind: config.kind,
            base_url,
            key_file: config.api_key_file,
            key: RwLock::new(key),
            prices: config.prices,
            limits: super::limits::Limits::new(
                config.requests_per_minute,
                config.tokens_per_minute,
            ),
        });
    }
    Ok(providers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_issue_example_loads_and_prices_by_model_or_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let key = write(dir.path(), "openai.key", "sk-real\n");
        let file = write(
            dir.path(),
            "providers.toml",
            &format!(
                r#"
[[provider]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key_file = "{}"
requests_per_minute = 500
tokens_per_minute = 200000
[provider.prices."gpt-4.1-mini"]
input = 0.40
output = 1.60
cached_input = 0.10
"#,
                key.display()
            ),
        );
        let providers = load(&file).unwrap();
        assert_eq!(providers[0].key(), "sk-real");
        assert_eq!(providers[0].base_url, "https://api.openai.com/v1");
        let usage = Usage {
            input_tokens: 1_000_000,
            cached_input_tokens: 500_000,
            output_tokens: 1_000_000,
            ..Usage::default()
        };
        let price = providers[0].price("gpt-4.1-mini-2025-04-14").unwrap();
        // 0.5M fresh at 0.40, 0.5M cached at 0.10, 1M out at 1.60: $1.85.
        assert_eq!(price.cost_micros(&usage), 1_850_000);
        assert!(providers[0].price("gpt-5").is_none());
    }

    #[test]
    fn mistakes_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let key = write(dir.path(), "k", "sk");
        let refused = |body: &str| {
            let file = write(dir.path(), "p.toml", body);
            load(&file).unwrap_err().to_string() + &format!("{:#}", load(&file).unwrap_err())
        };
        let provider = |extra: &str| {
            format!(
                "[[provider]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://x\"\napi_key_file = \"{}\"\n{extra}",
                key.display()
            )
        };
        assert!(refused("").contains("lists no [[provider]]"));
        assert!(refused(&provider("colour = 1")).contains("colour"));
        assert!(refused(&(provider("") + &provider(""))).contains("listed twice"));
        assert!(refused(&provider("").replace("openai\"", "gemini\"")).contains("gemini"));
        assert!(refused(&provider("").replace("http://x", "ftp://x")).contains("http://"));
        assert!(
            refused(&provider("").replace(&key.display().to_string(), "/nonexistent"))
                .contains("/nonexistent")
        );
        assert!(
            refused(&provider("[provider.prices.m]\ninput = -1.0\noutput = 1.0"))
                .contains("prices of `m`")
        );
        assert!(refused(&provider("").replace("name = \"a\"", "name = \"a/b\"")).contains("a/b"));
    }
}
