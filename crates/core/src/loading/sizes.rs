//! Config sizes checked against the weights before a model is built from them.
//!
//! Building a model allocates some things eagerly from its config (norm weights of
//! `hidden_size`, one struct per layer), so a config.json or GGUF header claiming 2^40 would
//! abort the process before any tensor is compared. No real model has a dimension larger than
//! its number of weights, or more layers than tensors: those bounds cost nothing to check and
//! keep every allocation made from the config proportional to the checkpoint's size.

use std::path::PathBuf;

use super::WeightSource;
use crate::{Error, Result};

/// Errors when a `dimension` exceeds the checkpoint's element count or a `layers` count its
/// tensor count. Each entry is `(config field, value)`.
pub fn check_config_sizes(
    weights: &dyn WeightSource,
    dimensions: &[(&str, usize)],
    layers: &[(&str, usize)],
) -> Result<()> {
    let tensors = weights.tensors();
    let elements: u128 = tensors
        .iter()
        .map(|t| t.shape.iter().map(|&d| d as u128).product::<u128>())
        .sum();
    let describe = || weights.describe();
    let fail = |field: &str, value: usize, bound: String| {
        Err(Error::config(
            PathBuf::from("config.json"),
            format!(
                "field `{field}` is {value}, more than {bound} of the checkpoint ({}); the \
                 config does not describe these weights",
                describe()
            ),
        ))
    };
    for &(field, value) in dimensions {
        if value as u128 > elements {
            return fail(field, value, format!("the {elements} weights"));
        }
    }
    for &(field, value) in layers {
        if value > tensors.len() {
            return fail(field, value, format!("the {} tensors", tensors.len()));
        }
    }
    Ok(())
}
