//! What top-k keeps of DeePEn's relative rows on real embeddings, and whether the top-k search
//! picks the dense search's token (issue: measure before quoting top-k).
//!
//! ```text
//! bash tools/fetch_smollm2.sh
//! cargo run --release --example deepen_topk -- --assist mistral-7b-v0.1
//! cargo run --release --example deepen_topk -- --assist t5
//! ```
//!
//! Main model: SmolLM2-135M-Instruct (the GGUF; its Q8_0 input embeddings dequantised), anchors
//! shared with a real tokenizer from `../shared/tokenizers/` (byte matching, as kiln's default),
//! τ = 100 as the paper. Part 1: for every row of SmolLM2's relative matrix, the probability
//! mass its k largest entries hold, as quantiles over the 49152 rows. Part 2: at each position of
//! a real text, a target in the relative space averaged (0.5/0.5) from SmolLM2's next-token
//! distribution with the full context and with only the last `--short` tokens (a second,
//! weaker view: no second real model's weights are available here), then the 5-step AdamW search
//! from the main logits with the dense matrix and with each top-k matrix; reported: how often
//! the top-k result's argmax equals the dense result's.

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::prelude::*;
use clap::Parser;
use kiln::backend::{Backend, device};
use kiln::core::packed::PackedFormat;
use kiln::core::{CausalLm, Tokenizer};
use kiln::ensemble::{
    AnchorConfig, RelativeConfig, RelativeMatrix, SearchConfig, Vocab, deepen_combine, find_anchors,
};
use rayon::prelude::*;

#[derive(Parser, Debug)]
struct Args {
    /// The main model (default: the SmolLM2 GGUF of tools/fetch_smollm2.sh).
    #[arg(long)]
    model: Option<String>,
    /// The tokenizer whose shared tokens are the anchors: a folder of `--tokenizers`.
    #[arg(long, default_value = "mistral-7b-v0.1")]
    assist: String,
    /// Folder of the real tokenizers.
    #[arg(long, default_value = "../shared/tokenizers")]
    tokenizers: PathBuf,
    /// k values for the kept-mass quantiles.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "8,16,32,64,128,256,512,1024"
    )]
    ks: Vec<usize>,
    /// k values for the search agreement.
    #[arg(long, value_delimiter = ',', default_value = "32,128,512")]
    search_ks: Vec<usize>,
    /// Formats of the dense matrix whose search is compared with the f32 one.
    #[arg(long, value_delimiter = ',', default_value = "f16,bf16,q8_0")]
    dense_formats: Vec<PackedFormat>,
    /// Positions of the text at which the searches run.
    #[arg(long, default_value_t = 120)]
    positions: usize,
    /// Context of the weaker second view.
    #[arg(long, default_value_t = 4)]
    short: usize,
    /// A text file to run on (default: the first SVAMP test questions in tests/data).
    #[arg(long)]
    text: Option<PathBuf>,
}

fn quantile(sorted: &[f32], q: f64) -> f32 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn host(t: Tensor<Backend, 1>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

fn argmax(v: &[f32]) -> usize {
    kiln::core::sampling::argmax(v) as usize
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = device();
    let spec = args.model.clone().unwrap_or_else(kiln::auto::default_model);
    let loaded = kiln::auto::load::<Backend>(&spec, &dev)?;
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .context("the model has no tokenizer")?;
    let model = &loaded.model;
    let embeddings = model.model.embed_tokens.dense_weight();
    let [vocab, hidden] = embeddings.dims();
    let assist_dir = args.tokenizers.join(&args.assist);
    let assist =
        Tokenizer::from_dir(&assist_dir).with_context(|| format!("{}", assist_dir.display()))?;
    let vocabs = [
        Vocab::from_tokenizer(tokenizer, vocab),
        Vocab::from_tokenizer(&assist, assist.vocab_size()),
    ];
    let names = ["main".to_string(), args.assist.clone()];
    let anchors = find_anchors(&[&vocabs[0], &vocabs[1]], &names, &AnchorConfig::default())?;
    let ids = &anchors.ids[0];
    println!(
        "{spec}: vocab {vocab}, hidden {hidden}; {} anchors shared with {} (τ = 100)",
        ids.len(),
        args.assist
    );

    // Part 1: mass kept by each row's top k.
    let dense = RelativeMatrix::build(embeddings.clone(), ids, &RelativeConfig::default())?;
    let a = ids.len();
    let rows: Vec<f32> = dense.to_f32()?;
    let kmax = *args.ks.iter().max().unwrap();
    let kept: Vec<Vec<f32>> = rows
        .par_chunks(a)
        .map(|row| {
            let mut row = row.to_vec();
            let k = kmax.min(a);
            if k < a {
                row.select_nth_unstable_by(k - 1, |x, y| y.total_cmp(x));
            }
            let total: f32 = row.iter().sum();
            let top = &mut row[..k];
            top.sort_unstable_by(|x, y| y.total_cmp(x));
            let mut sums = Vec::with_capacity(args.ks.len());
            for &k in &args.ks {
                sums.push(top[..k.min(top.len())].iter().sum::<f32>() / total);
            }
            sums
        })
        .collect();
    drop(rows);
    println!("\nmass kept by a row's top k (quantiles over {vocab} rows)");
    println!(
        "{:>6} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "k", "p5", "p25", "median", "mean", "p95"
    );
    for (j, &k) in args.ks.iter().enumerate() {
        let mut m: Vec<f32> = kept.iter().map(|s| s[j]).collect();
        m.sort_unstable_by(f32::total_cmp);
        let mean = m.iter().map(|&x| x as f64).sum::<f64>() / m.len() as f64;
        println!(
            "{k:>6} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>7.3}",
            quantile(&m, 0.05),
            quantile(&m, 0.25),
            quantile(&m, 0.5),
            mean,
            quantile(&m, 0.95)
        );
    }

    // Part 2: the search with dense and top-k matrices on real text.
    let text = match &args.text {
        Some(path) => std::fs::read_to_string(path)?,
        None => {
            let path = "tests/data/datasets/step-by-step/svamp/svamp_test.json";
            let lines = std::fs::read_to_string(path).with_context(|| path.to_string())?;
            let mut questions = Vec::new();
            for line in lines.lines().take(12) {
                let q: serde_json::Value = serde_json::from_str(line)?;
                questions.push(q["input"].as_str().unwrap_or_default().to_string());
            }
            questions.join("\n")
        }
    };
    let tokens = tokenizer.encode(&text, true)?;
    let n = args
        .positions
        .min(tokens.len().saturating_sub(args.short + 1));
    let start = tokens.len() - n;
    // Logits after `context`: the last position's, or every position's with `all`.
    let logits_at = |context: &[u32], all: bool| -> Vec<f32> {
        let mut cache = model.new_cache(vec![0]);
        let ids = context.iter().map(|&t| t as i64).collect();
        let t =
            Tensor::<Backend, 2, Int>::from_data(TensorData::new(ids, [1, context.len()]), &dev);
        model
            .forward(t, &mut cache, all)
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap()
    };
    let full = logits_at(&tokens, true);
    let build = |configs: Vec<RelativeConfig>| {
        configs
            .iter()
            .map(|c| RelativeMatrix::build(embeddings.clone(), ids, c))
            .collect::<Result<Vec<_>, _>>()
    };
    let sparse = build(
        args.search_ks
            .iter()
            .map(|&k| RelativeConfig::default().with_top_k(Some(k)))
            .collect(),
    )?;
    let compressed = build(
        args.dense_formats
            .iter()
            .map(|&f| RelativeConfig::default().with_dense_format(f))
            .collect(),
    )?;
    let search = SearchConfig::default();
    let (mut same, mut moved) = (vec![0usize; sparse.len()], 0usize);
    let mut same_format = vec![0usize; compressed.len()];
    for pos in start..tokens.len() {
        // Logits for the token after `pos`: the full context, and the last `short` tokens.
        let main = full[(pos - 1) * vocab..pos * vocab].to_vec();
        let weak = logits_at(&tokens[pos - args.short..pos], false);
        let members = |m: &RelativeMatrix<Backend>| {
            let l = [main.clone(), weak.clone()]
                .map(|l| Tensor::<Backend, 1>::from_data(TensorData::new(l, [vocab]), &dev));
            let z = deepen_combine(&l, &[m.clone(), m.clone()], &[0.5, 0.5], &search)?;
            anyhow::Ok(argmax(&host(z)))
        };
        let want = members(&dense)?;
        moved += usize::from(want != argmax(&main));
        for (s, m) in same.iter_mut().zip(&sparse) {
            *s += usize::from(members(m)? == want);
        }
        for (s, m) in same_format.iter_mut().zip(&compressed) {
            *s += usize::from(members(m)? == want);
        }
    }
    println!(
        "\nsearch over {n} positions of the text (dense search's token differs from the main \
         model's own at {moved}):"
    );
    for (k, s) in args.search_ks.iter().zip(&same) {
        println!(
            "  top-{k}: same token as the dense search at {s}/{n} ({:.1}%)",
            100.0 * *s as f64 / n as f64
        );
    }
    for (f, s) in args.dense_formats.iter().zip(&same_format) {
        println!(
            "  dense {f}: same token as the f32 dense search at {s}/{n} ({:.1}%)",
            100.0 * *s as f64 / n as f64
        );
    }
    Ok(())
}
