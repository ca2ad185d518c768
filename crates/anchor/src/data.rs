//! Reading training texts: plain text, JSONL, or a JSON array of strings.

use std::path::Path;

use kiln_core::Tokenizer;

use crate::{AcPlacement, AnchorError, AnchorSet, Result, encode_ac};

/// Texts from `path`:
/// - a JSON array of strings (e.g. the step-by-step rationales `llm/*_CoT_*.json`): each
///   string up to its first blank line (the rationale, without a run-on next question);
/// - JSONL: the string field `field` (default `text`) of every line;
/// - otherwise plain text: every non-empty line is a document.
pub fn read_texts(path: &Path, field: Option<&str>) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| AnchorError::io(path, e))?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let items: Vec<String> =
            serde_json::from_str(trimmed).map_err(|e| AnchorError::io(path, e))?;
        return Ok(items
            .into_iter()
            .map(|s| s.split("\n\n").next().unwrap_or("").trim().to_string())
            .filter(|s| !s.is_empty())
            .collect());
    }
    if trimmed.starts_with('{') {
        let field = field.unwrap_or("text");
        let mut out = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let value: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| AnchorError::io(path, format!("line {}: {e}", i + 1)))?;
            let s = value.get(field).and_then(|v| v.as_str()).ok_or_else(|| {
                AnchorError::io(path, format!("line {}: no string field `{field}`", i + 1))
            })?;
            out.push(s.to_string());
        }
        return Ok(out);
    }
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// Tokenizes `texts` as training documents: in AC mode (`ac` given) with `<AC>` between
/// sentences and none after the last, as the reference's `add_ac` ([`AcPlacement::Document`]),
/// else plainly; `bos` first when given.
pub fn tokenize(
    tokenizer: &Tokenizer,
    texts: &[String],
    ac: Option<&AnchorSet>,
    bos: Option<u32>,
) -> Result<Vec<Vec<u32>>> {
    texts
        .iter()
        .map(|t| match ac.and_then(|a| a.ids.first().copied()) {
            Some(id) => encode_ac(tokenizer, t, id, bos, AcPlacement::Document),
            None => {
                let mut ids: Vec<u32> = bos.into_iter().collect();
                ids.extend(tokenizer.encode(t, false)?);
                Ok(ids)
            }
        })
        .collect()
}
