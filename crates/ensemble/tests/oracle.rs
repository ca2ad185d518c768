//! DeePEn's relative representation against values computed independently with NumPy (float64,
//! the reference's formula: cosine of L2-normalised embeddings with the anchors, each row
//! L2-normalised again, softmax at temperature τ). τ = 2 and rows that are not unit-norm, so a
//! wrong τ or a missing normalisation changes the numbers.

use burn::backend::NdArray;
use burn::prelude::*;
use kiln_ensemble::{RelativeConfig, RelativeMatrix, weights_from_scores};

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
