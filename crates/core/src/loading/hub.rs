use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Where a model's files are: a local folder in HF layout.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The folder holding config.json, tokenizer.json and the weights.
    pub dir: PathBuf,
}

impl ModelFiles {
    /// `dir/name`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `dir/name` if it exists.
    pub fn optional(&self, name: &str) -> Option<PathBuf> {
        Some(self.file(name)).filter(|p| p.is_file())
    }
}

const OPTIONAL_FILES: [&str; 5] = [
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "chat_template.jinja",
];

/// Resolves `spec`, a local folder or a Hugging Face hub id (`org/name`, optionally
/// `org/name@revision`), to a folder holding the model's files.
///
/// Hub downloads go through `hf-hub` into its standard cache (`HF_HOME`, default
/// `~/.cache/huggingface`) with a progress bar. With `HF_HUB_OFFLINE=1` only the cache is read.
pub fn resolve_model(spec: &str) -> Result<ModelFiles> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(ModelFiles {
            dir: path.to_path_buf(),
        });
    }
    if path.exists() {
        return Err(Error::arg(
            "model",
            format!("{spec} is a file; give the folder holding config.json and the weights"),
        ));
    }
    let looks_like_id =
        spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.ends_with('/');
    if !looks_like_id {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            hint: " (expected a model folder or a hub id such as `HuggingFaceTB/SmolLM2-135M-Instruct`)".into(),
        });
    }
    let (id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id.to_string(), rev.to_string()),
        None => (spec.to_string(), "main".to_string()),
    };
    let repo = hf_hub::Repo::with_revision(id.clone(), hf_hub::RepoType::Model, revision);
    if offline() {
        from_cache(&id, repo)
    } else {
        download(&id, repo)
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
}

fn from_cache(id: &str, repo: hf_hub::Repo) -> Result<ModelFiles> {
    let cache = hf_hub::Cache::from_env().repo(repo);
    let config = cache.get("config.json").ok_or_else(|| {
        Error::Hub(format!(
            "{id} is not in the hub cache ({}) and HF_HUB_OFFLINE is set",
            hf_hub::Cache::from_env().path().display()
        ))
    })?;
    let weights = cache
        .get("model.safetensors")
        .or_else(|| cache.get("model.safetensors.index.json"));
    if weights.is_none() {
        return Err(Error::Hub(format!(
            "{id}: the cache has config.json but no model.safetensors(.index.json); HF_HUB_OFFLINE is set"
        )));
    }
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(ModelFiles { dir })
}

fn download(id: &str, repo: hf_hub::Repo) -> Result<ModelFiles> {
    let hub_err =
        |file: &str, e: hf_hub::api::sync::ApiError| Error::Hub(format!("{id}/{file}: {e}"));
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| Error::Hub(e.to_string()))?;
    let repo = api.repo(repo);
    let config = repo
        .get("config.json")
        .map_err(|e| hub_err("config.json", e))?;
    for file in OPTIONAL_FILES {
        // Absent optional files are normal (404); real failures surface when the file is read.
        let _ = repo.get(file);
    }
    match repo.get("model.safetensors") {
        Ok(_) => {}
        Err(single_err) => {
            let index = repo
                .get("model.safetensors.index.json")
                .map_err(|_| hub_err("model.safetensors", single_err))?;
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: std::collections::HashMap<String, String>,
            }
            let parsed: Index = super::read_json(&index)?;
            let mut shards: Vec<_> = parsed.weight_map.into_values().collect();
            shards.sort();
            shards.dedup();
            for shard in shards {
                repo.get(&shard).map_err(|e| hub_err(&shard, e))?;
            }
        }
    }
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(ModelFiles { dir })
}
