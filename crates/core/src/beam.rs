//! Beam search for encoder-decoder models, following HF transformers' (vectorised, 4.50+)
//! `_beam_search` step for step, so that the same model gives the same sequences:
//!
//! - each step, the log-softmax of the logits (after the n-gram ban and forced first token,
//!   applied to log-probs as HF's logits processors are) is added to each running beam's score,
//!   and the best `max(2, 1 + n_eos) · num_beams` (beam, token) candidates of each row are kept;
//! - a candidate among the first `num_beams` that ends in EOS (or reaches the maximum length)
//!   becomes a finished hypothesis with score `sum_logprobs / len^length_penalty`, `len` being
//!   the generated length (decoder start token excluded, EOS included); the `num_beams` best
//!   finished hypotheses are kept;
//! - the next running beams are the best `num_beams` candidates that did not finish;
//! - a row is done once it has `num_beams` finished hypotheses (`early_stopping = true`) or no
//!   running beam can beat the worst finished one (HF's heuristic when `early_stopping = false`).
//!
//! Scores are accumulated in `f32`, with HF's `-1e9` sentinels, so ties break the same way.

use burn::prelude::*;

use crate::generate::{FinishReason, GenerationConfig};
use crate::seq2seq::{
    EncoderOutput, Seq2SeqLm, Seq2SeqOutput, ban_repeated_ngrams, force_token, host_rows,
};
use crate::{Error, Result};

/// HF's "minus infinity that still sorts": added to scores of beams that must not be chosen.
const NEG: f32 = -1.0e9;

/// `log_softmax` in `f32`, as torch computes it: `x - max - ln(sum(exp(x - max)))`.
fn log_softmax(logits: &mut [f32]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&x| (x - max).exp()).sum();
    let log_sum = sum.ln();
    logits.iter_mut().for_each(|x| *x = *x - max - log_sum);
}

/// Indices of the `k` largest values, best first; ties keep the lower index first.
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    // (value desc, index asc) is a total order, so partitioning around the k-th element and
    // sorting only the first k gives exactly the full sort's prefix. A full sort of
    // num_beams × vocab candidates (1M for NLLB) per row and step cost more than the model.
    let order = |&a: &usize, &b: &usize| values[b].total_cmp(&values[a]).then(a.cmp(&b));
    let mut idx: Vec<usize> = (0..values.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k, order);
        idx.truncate(k);
    }
    idx.sort_by(order);
    idx
}

/// One finished-hypothesis slot of a batch row.
#[derive(Debug, Clone)]
struct Finished {
    seq: Vec<u32>,
    score: f32,
    done: bool,
}

/// Beam search over an encoded batch; returns each row's best hypothesis.
///
/// The decoder cache is expanded to `batch · num_beams` rows and reordered after every step
/// through [`Seq2SeqLm::reorder_cache`], so any model implementing the trait works. `config`'s
/// EOS ids are used as given ([`GenerationConfig::resolve`] fills the model's); its sampling
/// and stop strings are not used.
pub fn beam_search<B: Backend, M: Seq2SeqLm<B>>(
    model: &M,
    encoder: &EncoderOutput<B>,
    config: &GenerationConfig,
) -> Result<Vec<Seq2SeqOutput>> {
    let k = config.num_beams;
    if k == 0 {
        return Err(Error::arg("num_beams", "must be at least 1"));
    }
    let device = model.device();
    let batch = encoder.hidden.dims()[0];
    let start = model.decoder_start_token_id();
    let eos = config.eos();
    let keep = 2.max(1 + eos.len()) * k;
    let prompt_len = 1usize;
    let max_length = prompt_len + config.max_new_tokens;

    let mut cache = model.new_decoder_cache(encoder);
    let expand: Vec<i64> = (0..batch * k).map(|i| (i / k) as i64).collect();
    model.reorder_cache(
        &mut cache,
        Tensor::from_data(TensorData::new(expand, [batch * k]), &device),
    );

    let mut running: Vec<Vec<u32>> = vec![vec![start]; batch * k];
    let mut running_scores: Vec<f32> = (0..batch * k)
        .map(|i| if i % k == 0 { 0.0 } else { NEG })
        .collect();
    let mut finished: Vec<Vec<Finished>> = vec![
        vec![
            Finished {
                seq: Vec::new(),
                score: NEG,
                done: false,
            };
            k
        ];
        batch
    ];

    let mut cur_len = prompt_len;
    while cur_len < max_length {
        let last: Vec<i64> = running.iter().map(|s| *s.last().unwrap() as i64).collect();
        let tokens = Tensor::from_data(TensorData::new(last, [batch * k, 1]), &device);
        let rows = host_rows(model.decode_step(tokens, &mut cache));
        let vocab = rows[0].len();

        let mut next_running = Vec::with_capacity(batch * k);
        let mut next_scores = Vec::with_capacity(batch * k);
        let mut sources = Vec::with_capacity(batch * k);
        let mut all_hit = true;
        for b in 0..batch {
            // Accumulated log-probs of every (beam, token) of this row.
            let mut flat = Vec::with_capacity(k * vocab);
            for beam in 0..k {
                let r = b * k + beam;
                let mut lp = rows[r].clone();
                log_softmax(&mut lp);
                ban_repeated_ngrams(&mut lp, &running[r], config.no_repeat_ngram_size);
                if let Some(t) = config.forced_bos_token_id
                    && cur_len == 1
                {
                    force_token(&mut lp, t);
                }
                flat.extend(lp.iter().map(|&x| x + running_scores[r]));
            }
            let cand = top_k(&flat, keep);
            let cand_scores: Vec<f32> = cand.iter().map(|&i| flat[i]).collect();
            let cand_seqs: Vec<Vec<u32>> = cand
                .iter()
                .map(|&i| {
                    let mut s = running[b * k + i / vocab].clone();
                    s.push((i % vocab) as u32);
                    s
                })
                .collect();
            let hits: Vec<bool> = cand
                .iter()
                .map(|&i| eos.contains(&((i % vocab) as u32)) || cur_len + 1 >= max_length)
                .collect();
            all_hit &= hits.iter().all(|&h| h);

            // Next running beams: the best candidates that did not finish.
            let run_scores: Vec<f32> = cand_scores
                .iter()
                .zip(&hits)
                .map(|(&s, &h)| if h { s + NEG } else { s })
                .collect();
            for i in top_k(&run_scores, k) {
                next_running.push(cand_seqs[i].clone());
                next_scores.push(run_scores[i]);
                sources.push((b * k + cand[i] / vocab) as i64);
            }

            // Finished hypotheses: merge the row's kept ones with this step's finishers.
            let denom = ((cur_len + 1 - prompt_len) as f64).powf(config.length_penalty as f64);
            let full = config.early_stopping && finished[b].iter().all(|f| f.done);
            let mut merged = finished[b].clone();
            for (i, (&s, &h)) in cand_scores.iter().zip(&hits).enumerate() {
                let just = h && i < k;
                let mut score = s / denom as f32;
                if full {
                    score += NEG;
                }
                if !just {
                    score += NEG;
                }
                merged.push(Finished {
                    seq: cand_seqs[i].clone(),
                    score,
                    done: just,
                });
            }
            let merged_scores: Vec<f32> = merged.iter().map(|f| f.score).collect();
            finished[b] = top_k(&merged_scores, k)
                .into_iter()
                .map(|i| merged[i].clone())
                .collect();
        }

        running = next_running;
        running_scores = next_scores;
        model.reorder_cache(
            &mut cache,
            Tensor::from_data(TensorData::new(sources, [batch * k]), &device),
        );
        cur_len += 1;

        // HF's `_beam_search_has_unfinished_sequences`, over the whole batch.
        // (kiln has no early_stopping="never", so the best hypothetical length is the current.)
        let hypothetical = cur_len - prompt_len;
        let hyp_denom = (hypothetical as f64).powf(config.length_penalty as f64) as f32;
        let improvement_possible = (0..batch).any(|b| {
            let best = running_scores[b * k] / hyp_denom;
            let worst = finished[b]
                .iter()
                .map(|f| f.score)
                .fold(f32::INFINITY, f32::min);
            finished[b]
                .iter()
                .any(|f| best > if f.done { worst } else { NEG })
        });
        let open = !(config.early_stopping && finished.iter().flatten().all(|f| f.done));
        if !(improvement_possible && open && !all_hit) {
            break;
        }
    }

    Ok(finished
        .into_iter()
        .map(|row| {
            let best = &row[0];
            let tokens = best.seq.get(prompt_len..).unwrap_or_default().to_vec();
            let finish = match tokens.last() {
                Some(t) if eos.contains(t) => FinishReason::Eos,
                _ => FinishReason::Length,
            };
            Seq2SeqOutput {
                tokens,
                text: None,
                score: Some(best.score),
                finish,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0], 3), vec![1, 2, 3]);
        assert_eq!(top_k(&[1.0, 3.0], 5), vec![1, 0]);
        assert_eq!(top_k(&[2.0, 2.0, 2.0, 5.0, 2.0], 2), vec![3, 0]);
        assert_eq!(top_k(&[1.0], 0), Vec::<usize>::new());
    }

    #[test]
    fn log_softmax_normalises() {
        let mut v = vec![1.0, 2.0, 3.0];
        log_softmax(&mut v);
        let total: f32 = v.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn ngram_ban_matches_hf() {
        let mut scores = vec![0.0; 6];
        // bigrams: (1,2), (2,3), (3,1); last token 1 → ban 2.
        ban_repeated_ngrams(&mut scores, &[1, 2, 3, 1], 2);
        assert_eq!(scores[2], f32::NEG_INFINITY);
        assert_eq!(scores.iter().filter(|s| s.is_infinite()).count(), 1);
    }
}
