//! DeePEn's relative representation against values computed independently with NumPy (float64,
//! the reference's formula: cosine of L2-normalised embeddings with the anchors, each row
//! L2-normalised again, softmax at temperature τ). τ = 2 and rows that are not unit-norm, so a
//! wrong τ or a missing normalisation changes the numbers. Then DeePEn's whole step (three
//! members, unequal weights, the AdamW/cosine search and the plain gradient step) against the
//! authors' code run in PyTorch (`tools/ensemble_oracle.py`).

use burn::backend::NdArray;
use burn::prelude::*;
use kiln_ensemble::{
    AnchorConfig, AnchorMatching, Anchors, RelativeConfig, RelativeMatrix, SearchConfig,
    SearchGradient, SearchOptimizer, Vocab, anchor_consistency, deepen_combine, find_anchors,
    keep_consistent_anchors, relative_average, weights_from_scores,
};

type B = NdArray;

const E: [[f32; 3]; 5] = [
    [0.3, -1.2, 2.0],
    [1.5, 0.4, -0.7],
    [-0.8, 0.9, 0.1],
    [2.2, -0.3, 0.6],
    [0.05, 1.7, -1.1],
];
const ANCHORS: [u32; 3] = [0, 2, 4];

/// NumPy: `R` for τ = 2.
const R: [[f64; 3]; 5] = [
    [0.832019759488043, 0.11251448698007309, 0.055465753531883946],
    [0.09096123280890551, 0.07180217184923166, 0.8372365953418629],
    [0.06331441522402863, 0.6297364581406685, 0.3069491266353028],
    [0.7723378746012252, 0.0554876548987029, 0.1721744705000718],
    [0.045718866869550116, 0.3378740580658, 0.6164070750646499],
];
const P: [f32; 5] = [0.1, 0.35, 0.05, 0.4, 0.1];
/// NumPy: `P @ R`, and with each row of R cut to its top 2 and renormalised.
const P_R: [f64; 3] = [0.43171116472056775, 0.12385149951833298, 0.4444373357610993];
const P_TOP2: [f64; 3] = [0.4494713117393973, 0.08093344633228068, 0.469595241928322];

fn matrix(top_k: Option<usize>) -> RelativeMatrix<B> {
    let device = Default::default();
    let flat: Vec<f32> = E.iter().flatten().copied().collect();
    let embeddings = Tensor::<B, 2>::from_data(TensorData::new(flat, [5, 3]), &device);
    let config = RelativeConfig::default()
        .with_temperature(2.0)
        .with_top_k(top_k);
    RelativeMatrix::build(embeddings, &ANCHORS, &config).unwrap()
}

fn close(got: &[f32], want: &[f64], what: &str) {
    for (g, w) in got.iter().zip(want) {
        assert!((*g as f64 - w).abs() < 2e-6, "{what}: {got:?} vs {want:?}");
    }
}

#[test]
fn dense_rows_and_mapping() {
    let device = Default::default();
    let r = matrix(None);
    for (i, row) in R.iter().enumerate() {
        let mut one_hot = [0f32; 5];
        one_hot[i] = 1.0;
        close(
            &r.map_host(&one_hot, &device).unwrap(),
            row,
            &format!("row {i}"),
        );
    }
    close(&r.map_host(&P, &device).unwrap(), &P_R, "P @ R");
}

#[test]
fn sparse_top_k_renormalises_each_row() {
    let device = Default::default();
    close(
        &matrix(Some(2)).map_host(&P, &device).unwrap(),
        &P_TOP2,
        "P @ top2(R)",
    );
}

#[test]
fn weights_from_scores_normalise() {
    let w = weights_from_scores(&[54.2, 60.1, 48.7]).unwrap();
    let sum = 54.2 + 60.1 + 48.7;
    close(&w, &[54.2 / sum, 60.1 / sum, 48.7 / sum], "weights");
    assert!(weights_from_scores(&[0.0, 0.0]).is_err());
    assert!(weights_from_scores(&[1.0, -1.0]).is_err());
}

/// `tools/ensemble_oracle.py`: the authors' code's combination step in PyTorch (float64) on
/// three members with different vocabularies, weights 0.5/0.3/0.2, τ = 3, rows not unit-norm and
/// a 12-step search (past the cosine's period of 10).
struct Deepen {
    json: serde_json::Value,
}

impl Deepen {
    fn load() -> Self {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/deepen_oracle.json");
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        Self {
            json: serde_json::from_str(&text).unwrap(),
        }
    }

    fn floats(&self, key: &str) -> Vec<f64> {
        self.json[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key}"))
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    }

    fn f32s(value: &serde_json::Value) -> Vec<f32> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    }

    fn scalar(&self, key: &str) -> f64 {
        self.json[key].as_f64().unwrap()
    }

    fn logits(&self) -> Vec<Tensor<B, 1>> {
        let device = Default::default();
        self.json["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let l = Self::f32s(l);
                let n = l.len();
                Tensor::from_data(TensorData::new(l, [n]), &device)
            })
            .collect()
    }

    fn weights(&self) -> Vec<f32> {
        Self::f32s(&self.json["weights"])
    }

    fn matrices(&self, top_k: Option<usize>) -> Vec<RelativeMatrix<B>> {
        let device = Default::default();
        let config = RelativeConfig::default()
            .with_temperature(self.scalar("temperature") as f32)
            .with_top_k(top_k);
        let embeddings = self.json["embeddings"].as_array().unwrap();
        let anchors = self.json["anchors"].as_array().unwrap();
        embeddings
            .iter()
            .zip(anchors)
            .map(|(e, a)| {
                let rows = e.as_array().unwrap();
                let flat: Vec<f32> = rows.iter().flat_map(Self::f32s).collect();
                let shape = [rows.len(), flat.len() / rows.len()];
                let e = Tensor::<B, 2>::from_data(TensorData::new(flat, shape), &device);
                let a: Vec<u32> = a
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect();
                RelativeMatrix::build(e, &a, &config).unwrap()
            })
            .collect()
    }

    fn search(&self) -> SearchConfig {
        SearchConfig::default()
            .with_learning_rate(self.scalar("learning_rate") as f32)
            .with_steps(self.scalar("steps") as usize)
    }
}

fn host(t: Tensor<B, 1>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

fn close_to(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    assert!(
        worst <= tol,
        "{what}: off by {worst}\n kiln {got:?}\n torch {want:?}"
    );
}

#[test]
fn three_member_average_with_unequal_weights() {
    let o = Deepen::load();
    let (logits, weights) = (o.logits(), o.weights());
    let dense = relative_average(&logits, &o.matrices(None), &weights).unwrap();
    close_to(
        &host(dense),
        &o.floats("average_dense"),
        1e-6,
        "dense average",
    );
    let k = o.scalar("top_k") as usize;
    let sparse = relative_average(&logits, &o.matrices(Some(k)), &weights).unwrap();
    close_to(
        &host(sparse),
        &o.floats("average_top_k"),
        1e-6,
        "top-k average",
    );
    // Equal weights give another point: the weights are not ignored.
    let equal = relative_average(&logits, &o.matrices(None), &[1.0 / 3.0; 3]).unwrap();
    let diff = host(equal)
        .iter()
        .zip(o.floats("average_dense"))
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(
        diff > 1e-3,
        "equal weights land on the weighted average ({diff})"
    );
}

#[test]
fn adamw_search_matches_pytorch_through_the_cosine_schedule() {
    let o = Deepen::load();
    let (logits, weights) = (o.logits(), o.weights());
    for gradient in [SearchGradient::Analytic, SearchGradient::Autodiff] {
        let search = o.search().with_gradient(gradient);
        let z = deepen_combine(&logits, &o.matrices(None), &weights, &search).unwrap();
        close_to(
            &host(z),
            &o.floats("adamw_dense"),
            2e-4,
            &format!("{gradient:?}"),
        );
    }
    let k = o.scalar("top_k") as usize;
    let z = deepen_combine(&logits, &o.matrices(Some(k)), &weights, &o.search()).unwrap();
    close_to(&host(z), &o.floats("adamw_top_k"), 2e-4, "top-k");
}

#[test]
fn plain_gradient_step_matches_pytorch() {
    let o = Deepen::load();
    let search = o.search().with_optimizer(SearchOptimizer::Sgd);
    for gradient in [SearchGradient::Analytic, SearchGradient::Autodiff] {
        let z = deepen_combine(
            &o.logits(),
            &o.matrices(None),
            &o.weights(),
            &search.clone().with_gradient(gradient),
        )
        .unwrap();
        close_to(
            &host(z),
            &o.floats("sgd_dense"),
            2e-4,
            &format!("{gradient:?}"),
        );
    }
}

/// `AnchorMatching::ReferenceStrings` finds the anchors the authors' `common_vocabulary.py`
/// finds (run by `tools/ensemble_oracle.py anchors` with Python `tokenizers`) between SmolLM2's
/// byte-level vocabulary and the SentencePiece vocabularies of Mistral-7B and T5: same count,
/// same (main id, assist id) pairs by checksum, same first pairs.
#[test]
fn reference_string_anchors_match_the_papers_code() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/tokenizers");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/reference_anchors.json"
    ))
    .unwrap();
    let want: serde_json::Value = serde_json::from_str(&text).unwrap();
    let vocab = |name: &str| {
        let dir = std::path::Path::new(root).join(name);
        let tokenizer = kiln_core::Tokenizer::from_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        Vocab::from_tokenizer(&tokenizer, tokenizer.vocab_size())
    };
    let main = vocab("smollm2-135m-instruct");
    let names = ["main".to_string(), "assist".to_string()];
    for assist in ["mistral-7b-v0.1", "t5"] {
        let other = vocab(assist);
        let config = AnchorConfig::default().with_matching(AnchorMatching::ReferenceStrings);
        let anchors = find_anchors(&[&main, &other], &names, &config).unwrap();
        let pairs: Vec<(u32, u32)> = anchors.ids[0]
            .iter()
            .copied()
            .zip(anchors.ids[1].iter().copied())
            .collect();
        let checksum = pairs.iter().fold(0u64, |h, &(m, s)| {
            (h.wrapping_mul(1000003).wrapping_add(m as u64))
                .wrapping_mul(1000003)
                .wrapping_add(s as u64)
        });
        let w = &want[assist];
        assert_eq!(pairs.len() as u64, w["count"].as_u64().unwrap(), "{assist}");
        let first: Vec<(u32, u32)> = w["first"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_u64().unwrap() as u32))
            .collect();
        assert_eq!(&pairs[..first.len()], &first[..], "{assist}");
        assert_eq!(
            checksum.to_string(),
            w["checksum"].as_str().unwrap(),
            "{assist}"
        );
        // kiln's byte matching finds a different set (more, across spellings).
        let bytes = find_anchors(&[&main, &other], &names, &AnchorConfig::default()).unwrap();
        assert_ne!(bytes.ids, anchors.ids, "{assist}");
    }
}

/// The reference's consistency-ranked anchor selection (`get_anchor_point_list_our`), run in
/// PyTorch on two members' embeddings and eight shared tokens: the scores, and the five kept.
#[test]
fn consistency_ranked_anchors_match_the_papers_code() {
    let o = Deepen::load();
    let c = &o.json["consistency"];
    let ids = |key: &str| -> Vec<u32> {
        c[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let (main, assist) = (ids("main"), ids("assist"));
    let anchors = Anchors {
        keys: (0..main.len()).map(|i| vec![i as u8]).collect(),
        ids: vec![main.clone(), assist.clone()],
    };
    let device = Default::default();
    let embeddings: Vec<Tensor<B, 2>> = o.json["embeddings"].as_array().unwrap()[..2]
        .iter()
        .map(|e| {
            let rows = e.as_array().unwrap();
            let flat: Vec<f32> = rows.iter().flat_map(Deepen::f32s).collect();
            let shape = [rows.len(), flat.len() / rows.len()];
            Tensor::from_data(TensorData::new(flat, shape), &device)
        })
        .collect();
    // Chunks of 3 rows: the chunked computation must equal the whole.
    let scores = anchor_consistency(&anchors, &embeddings, 3).unwrap();
    let want: Vec<f64> = Deepen::f32s(&c["scores"])
        .iter()
        .map(|&x| x as f64)
        .collect();
    close_to(&scores, &want, 1e-5, "consistency");
    let kept = keep_consistent_anchors(&anchors, &embeddings, 5).unwrap();
    let mut want: Vec<u32> = ids("kept").iter().map(|&i| main[i as usize]).collect();
    want.sort_unstable();
    assert_eq!(kept.ids[0], want);
    let assist_kept: Vec<u32> = want
        .iter()
        .map(|m| assist[main.iter().position(|x| x == m).unwrap()])
        .collect();
    assert_eq!(kept.ids[1], assist_kept);
}
