//! Dequantisation is bit-exact against the `gguf` Python package, and so is quantisation where
//! gguf-py's quantiser is ggml's arithmetic (fixtures made by `tools/gguf_reference.py`).

mod common;

use kiln_gguf::{GgmlType, GgufError, dequantize, dequantize_into, quantize};

const TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
];

#[test]
fn fixtures_are_bit_exact() {
    let dir = common::fixtures().join("quant");
    for &t in TYPES {
        let raw = std::fs::read(dir.join(format!("{t}.bin"))).expect("fixture .bin");
        let expected = common::read_f32(&dir.join(format!("{t}.f32")));
        let got = dequantize(t, &raw).unwrap();
        assert_eq!(got.len(), expected.len(), "{t}: element count");
        let mismatches: Vec<_> = got
            .iter()
            .zip(&expected)
            .enumerate()
            .filter(|(_, (a, b))| a.to_bits() != b.to_bits())
            .take(5)
            .collect();
        assert!(
            mismatches.is_empty(),
            "{t}: first mismatches (index, (ours, gguf-py)): {mismatches:?}"
        );
        eprintln!("{t}: {} values bit-exact", got.len());
    }
}

/// Q4_0, Q4_1, Q5_0 and Q5_1 blocks quantised by gguf-py from the same values (an all-zero
/// block, small values and outliers), byte for byte. (gguf-py's Q8_0 rounds half to even where
/// ggml rounds half away from zero, so Q8_0 has no such fixture.)
#[test]
fn four_and_five_bit_quantisation_matches_gguf_py() {
    let dir = common::fixtures().join("quant");
    for t in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
    ] {
        assert_quantises_as_fixture(&dir, t);
    }
}

/// Q2_K, Q3_K, IQ4_XS and IQ4_NL blocks quantised by ggml's own C
/// (`tools/ggml_q2_k_reference.c`, `ggml_q3_k_reference.c`, `ggml_iq4_xs_reference.c`: the
/// quantisers copied from llama.cpp) from values with an all-zero block, an all-zero group and
/// unequal group scales (Q2_K also an all-positive block), byte for byte.
#[test]
fn q2_k_q3_k_and_iq4_quantisation_matches_ggml() {
    let dir = common::fixtures().join("quant");
    for t in [
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::IQ4_XS,
        GgmlType::IQ4_NL,
    ] {
        assert_quantises_as_fixture(&dir, t);
    }
}

/// `quantize(t, <t>.in.f32)` against the committed `<t>.quantized`, byte for byte.
fn assert_quantises_as_fixture(dir: &std::path::Path, t: GgmlType) {
    let values = common::read_f32(&dir.join(format!("{t}.in.f32")));
    let expected = std::fs::read(dir.join(format!("{t}.quantized"))).expect("fixture");
    let got = quantize(t, &values).unwrap();
    assert_eq!(got.len(), expected.len(), "{t}: byte count");
    let first = got.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(first, None, "{t}: first differing byte");
}

#[test]
fn threaded_path_matches_single_block_path() {
    // Large enough to take the multi-threaded path: repeat the Q4_K fixture blocks.
    let dir = common::fixtures().join("quant");
    for t in [GgmlType::Q4_K, GgmlType::Q8_0, GgmlType::F16] {
        let raw = std::fs::read(dir.join(format!("{t}.bin"))).unwrap();
        let expected = common::read_f32(&dir.join(format!("{t}.f32")));
        let reps = 200;
        let big: Vec<u8> = raw.iter().copied().cycle().take(raw.len() * reps).collect();
        let got = dequantize(t, &big).unwrap();
        assert_eq!(got.len(), expected.len() * reps);
        for (chunk, _) in got.chunks(expected.len()).zip(0..reps) {
            assert!(
                chunk
                    .iter()
                    .zip(&expected)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{t}"
            );
        }
    }
}

#[test]
fn size_errors_do_not_panic() {
    assert!(matches!(
        dequantize(GgmlType::Q4_0, &[0u8; 17]),
        Err(GgufError::Shape(_))
    ));
    let mut out = vec![0f32; 31];
    assert!(matches!(
        dequantize_into(GgmlType::Q4_0, &[0u8; 18], &mut out),
        Err(GgufError::Shape(_))
    ));
    assert!(matches!(
        dequantize(GgmlType::IQ2_XXS, &[0u8; 66]),
        Err(GgufError::UnsupportedType { .. })
    ));
    assert_eq!(dequantize(GgmlType::Q6_K, &[]).unwrap(), Vec::<f32>::new());
}

#[test]
fn q8_0_by_hand() {
    // d = 0.5 (f16 0x3800), q = 0, 1, -1, 127, -128, then zeros.
    let mut block = vec![0x00, 0x38];
    block.extend_from_slice(&[0, 1, 0xFF, 127, 0x80]);
    block.resize(34, 0);
    let y = dequantize(GgmlType::Q8_0, &block).unwrap();
    assert_eq!(&y[..5], &[0.0, 0.5, -0.5, 63.5, -64.0]);
}

#[test]
fn q4_0_by_hand() {
    // d = 2.0 (f16 0x4000); byte j holds element j (low nibble) and j + 16 (high nibble).
    let mut block = vec![0x00, 0x40];
    block.push(0xF0); // element 0: 0 - 8 = -8 -> -16; element 16: 15 - 8 = 7 -> 14
    block.resize(18, 0x88); // the rest: 8 - 8 = 0
    let y = dequantize(GgmlType::Q4_0, &block).unwrap();
    assert_eq!(y[0], -16.0);
    assert_eq!(y[16], 14.0);
    assert!(
        y.iter()
            .enumerate()
            .all(|(i, &v)| i == 0 || i == 16 || v == 0.0)
    );
}
