use super::*;

/// Deterministic values with a spread of magnitudes and signs (and rows not normalised).
fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let t = (i as f32 + seed as f32 * 7.31) * 0.6180339;
            (t.sin() * 1.7 + (3.0 * t).cos() * 0.4) * (1.0 + (i % 5) as f32 * 0.25)
        })
        .collect()
}

const ALL: [PackedFormat; 9] = [
    PackedFormat::F32,
    PackedFormat::F16,
    PackedFormat::BF16,
    PackedFormat::Q8_0,
    PackedFormat::Q4_0,
    PackedFormat::Q4_1,
    PackedFormat::Q5_0,
    PackedFormat::Q5_1,
    PackedFormat::IQ4_NL,
];

/// The oracle: dequantise every row (ggml's arithmetic), multiply in f64. Also returns, per
/// output, the most the 4-bit kernels' two-part i16 activations may move it:
/// `Σ |w_k|·amax_g/(32767·131072)` (half a step of the low part; `g` the value's scale group,
/// 32 values or a K-quant's 256), zero for the other formats.
fn reference(w: &PackedMatrix, x: &[f32], m: usize) -> (Vec<f32>, Vec<f32>) {
    let dense = w.to_f32();
    let (rows, cols) = (w.rows(), w.cols());
    // The K-quants take the same two-part i16 activations.
    let four_bit = kernels::splits_i16(w.format());
    let group = kernels::scale_group(w.format());
    let mut y = vec![0f32; m * rows];
    let mut bound = vec![0f32; m * rows];
    for j in 0..m {
        let xr = &x[j * cols..(j + 1) * cols];
        for r in 0..rows {
            let wr = &dense[r * cols..(r + 1) * cols];
            y[j * rows + r] = (0..cols).map(|k| xr[k] as f64 * wr[k] as f64).sum::<f64>() as f32;
            if four_bit {
                bound[j * rows + r] = (0..cols)
                    .map(|k| {
                        let block = &xr[k / group * group..(k / group + 1) * group];
                        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
                        wr[k].abs() * amax / (32767.0 * 131072.0)
                    })
                    .sum();
            }
        }
    }
    (y, bound)
}

fn assert_close(got: &[f32], (want, bound): &(Vec<f32>, Vec<f32>), what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((g, w), b)) in got.iter().zip(want).zip(bound).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * (1.0 + w.abs()) + 1.01 * b,
            "{what}: element {i}: {g} vs {w} (allowed {b} for 16-bit activations)"
        );
    }
}

#[test]
fn matmul_matches_the_dequantised_product_for_every_format_and_row_count() {
    // 3 x 160 columns: five blocks; 37 output rows: not a multiple of any chunk.
    let (rows, cols) = (37, 160);
    let w = values(rows * cols, 1);
    for format in ALL {
        let packed = PackedMatrix::from_f32(rows, cols, &w, format).unwrap();
        for m in [1, 2, 3, 4, 5, MATVEC_MAX_ROWS, MATVEC_MAX_ROWS + 1, 33] {
            let x = values(m * cols, 2 + m as u32);
            let got = packed.matmul_t(&x, m);
            assert_close(&got, &reference(&packed, &x, m), &format!("{format} m={m}"));
        }
    }
}

#[test]
fn float_formats_take_widths_that_are_not_whole_blocks() {
    let (rows, cols) = (9, 45);
    let w = values(rows * cols, 3);
    for format in [PackedFormat::F32, PackedFormat::F16, PackedFormat::BF16] {
        let packed = PackedMatrix::from_f32(rows, cols, &w, format).unwrap();
        for m in [1, 3, 12] {
            let x = values(m * cols, 4);
            assert_close(
                &packed.matmul_t(&x, m),
                &reference(&packed, &x, m),
                &format!("{format} m={m}"),
            );
        }
    }
    assert!(PackedMatrix::from_f32(1, 45, &w[..45], PackedFormat::Q8_0).is_err());
}

#[test]
fn portable_and_simd_kernels_agree() {
    // Six weight rows against 1..=6 activation rows: every tile shape of the kernels (one weight
    // row or a pair; 1 to 4 activation rows at a time), the last pair ending the buffer. Odd
    // row counts and widths that are not whole blocks are in the tests above.
    let (rows, cols) = (6, 256);
    let w = values(rows * cols, 5);
    for format in ALL {
        let packed = PackedMatrix::from_f32(rows, cols, &w, format).unwrap();
        for m in 1..=6 {
            let x = values(m * cols, 6 + m as u32);
            let acts = kernels::Acts::new(format, ActivationPrecision::F32, &x, m, cols);
            let mut portable = vec![0f32; rows * m];
            kernels::dot_portable(format, packed.bytes(), &acts, &mut portable);
            // The portable kernel is the f32 reference: allow the fast ones their activation
            // rounding. All are [rows, m]; the oracle's bound is [m, rows].
            let (_, bound) = reference(&packed, &x, m);
            let bound: Vec<f32> = (0..rows * m)
                .map(|i| bound[(i % m) * rows + i / m])
                .collect();
            for (name, kernel) in kernels::kernels(format) {
                let mut fast = vec![0f32; rows * m];
                kernel(format, packed.bytes(), &acts, &mut fast);
                let want = (portable.clone(), bound.clone());
                assert_close(&fast, &want, &format!("{format} m={m} {name}"));
            }
        }
    }
}

#[test]
fn f32_is_exact_and_quantisation_error_is_bounded_by_the_block_step() {
    let (rows, cols) = (4, 64);
    let w = values(rows * cols, 7);
    assert_eq!(
        PackedMatrix::from_f32(rows, cols, &w, PackedFormat::F32)
            .unwrap()
            .to_f32(),
        w
    );
    // Q4_0 spans [-8d, 7d] with |8d| the block's largest magnitude, so values near the other
    // end (beyond 7d) clip to 7d: up to a whole step of error there, as in ggml.
    for (format, levels, steps) in [
        (PackedFormat::Q8_0, 127.0f32, 0.5),
        (PackedFormat::Q4_0, 8.0, 1.0),
        (PackedFormat::Q4_1, 15.0, 0.5),
    ] {
        let back = PackedMatrix::from_f32(rows, cols, &w, format)
            .unwrap()
            .to_f32();
        for (block, (a, b)) in w.chunks(32).zip(back.chunks(32)).enumerate() {
            let amax = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            // Q4_1's step is range/15, at most 2·amax/15; the others amax/levels. `steps` of
            // them, plus the f16 rounding of the scale.
            let step = if format == PackedFormat::Q4_1 {
                2.0 * amax / levels
            } else {
                amax / levels
            };
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= steps * step * 1.01 + 1e-3 * amax,
                    "{format} block {block}: {x} -> {y} (step {step})"
                );
            }
        }
    }
}

#[test]
fn hand_computed_q4_1_and_q8_0_blocks() {
    // Q4_1 block: d = 0.5, m = -1, q = 0..16 then 15..0 in nibbles: y = q·0.5 − 1.
    let mut block = Vec::new();
    block.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
    block.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
    for j in 0..16u8 {
        block.push(j | ((15 - j) << 4));
    }
    let q41 = PackedMatrix::from_bytes(1, 32, PackedFormat::Q4_1, &block).unwrap();
    let want: Vec<f32> = (0..32)
        .map(|i| if i < 16 { i as f32 } else { (31 - i) as f32 } * 0.5 - 1.0)
        .collect();
    assert_eq!(q41.to_f32(), want);
    let x: Vec<f32> = (0..32)
        .map(|i| if i % 2 == 0 { 1.0 } else { -0.5 })
        .collect();
    let dot: f32 = want.iter().zip(&x).map(|(a, b)| a * b).sum();
    let got = q41.matmul_t(&x, 1)[0];
    assert!((got - dot).abs() < 1e-5, "{got} vs {dot}");

    // Q8_0: d = 0.25, q = -16..16.
    let mut block = f16::from_f32(0.25).to_le_bytes().to_vec();
    block.extend((-16i8..16).map(|q| q as u8));
    let q8 = PackedMatrix::from_bytes(1, 32, PackedFormat::Q8_0, &block).unwrap();
    assert_eq!(
        q8.to_f32(),
        (-16..16).map(|q| q as f32 * 0.25).collect::<Vec<_>>()
    );
    assert!(PackedMatrix::from_bytes(1, 32, PackedFormat::Q8_0, &block[..33]).is_err());
}

#[test]
fn gather_rows_is_an_embedding_lookup_and_rejects_ids_past_the_end() {
    let (rows, cols) = (5, 32);
    let w = values(rows * cols, 9);
    let packed = PackedMatrix::from_f32(rows, cols, &w, PackedFormat::Q8_0).unwrap();
    let dense = packed.to_f32();
    let got = packed.gather_rows(&[4, 0, 4]).unwrap();
    assert_eq!(&got[..32], &dense[128..160]);
    assert_eq!(&got[32..64], &dense[..32]);
    assert!(packed.gather_rows(&[5]).is_err());
}

#[test]
fn simd_dequantisation_is_bit_identical_to_the_scalar_reference() {
    // Element formats also at a width with a tail after the SIMD runs.
    let cases = ALL
        .iter()
        .map(|&f| (f, 96))
        .chain(ALL.iter().filter(|f| f.block_len() == 1).map(|&f| (f, 45)));
    for (format, cols) in cases {
        let rows = 3;
        let w = values(rows * cols, 11);
        let packed = PackedMatrix::from_f32(rows, cols, &w, format).unwrap();
        for r in 0..rows {
            let (mut fast, mut slow) = (vec![0f32; cols], vec![0f32; cols]);
            kernels::dequantize_row(format, packed.row(r), &mut fast);
            kernels::dequantize_row_scalar(format, packed.row(r), &mut slow);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&slow), "{format} row {r}");
        }
    }
}

#[test]
fn non_finite_scales_and_values_are_found_by_row() {
    let (rows, cols) = (4, 64);
    let w = values(rows * cols, 13);
    for format in ALL {
        let packed = PackedMatrix::from_f32(rows, cols, &w, format).unwrap();
        assert_eq!(packed.first_non_finite_row(), None, "{format}");
        // Row 2: a NaN in the second block's scale (block formats) or its first value.
        let mut bytes = packed.bytes().to_vec();
        let at = 2 * format.row_bytes(cols)
            + if format.block_len() == 32 {
                format.block_bytes()
            } else {
                0
            };
        let nan: &[u8] = match format {
            PackedFormat::F32 => &[0, 0, 0xC0, 0x7F],
            PackedFormat::BF16 => &[0xC0, 0x7F],
            _ => &[0x00, 0x7E],
        };
        bytes[at..at + nan.len()].copy_from_slice(nan);
        let bad = PackedMatrix::from_bytes(rows, cols, format, &bytes).unwrap();
        assert_eq!(bad.first_non_finite_row(), Some(2), "{format}");
    }
}

/// Where value `k` of the activation rows sits in `Acts::q16` and `q16_lo`: in order, except
/// that the K-quants store each 32 values' even ones first, then the odd ones.
fn q16_position(format: PackedFormat, k: usize) -> usize {
    if !format.is_k_quant() {
        return k;
    }
    let i = k % 32;
    k - i
        + if i.is_multiple_of(2) {
            i / 2
        } else {
            16 + i / 2
        }
}

#[test]
fn four_bit_activation_parts_hold_each_value_to_half_a_low_step() {
    // Two rows of three scale groups (32 values, a K-quant's 256): mixed signs and magnitudes,
    // an all-zero group, a group with one large value, and exact halves of the i16 step
    // (rounding ties). The K-quants' per-32 sums must stay per 32 values.
    #[cfg(target_arch = "x86_64")]
    let simd = super::avx2::available();
    #[cfg(not(target_arch = "x86_64"))]
    let simd = false;
    if !simd {
        eprintln!("no AVX2: the i16 parts are not built (the portable kernels read f32)");
        return;
    }
    for (format, group) in [(PackedFormat::Q4_1, 32), (PackedFormat::Q4_K, 256)] {
        assert_eq!(kernels::scale_group(format), group);
        let cols = 3 * group;
        let mut x = values(2 * cols, 11);
        x[group..2 * group].fill(0.0);
        x[2 * group] = 1000.0;
        for (i, v) in x[cols + group..cols + 2 * group].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) + 0.5;
        }
        let acts = kernels::Acts::new(format, ActivationPrecision::F32, &x, 2, cols);
        assert_eq!(acts.scale.len(), 2 * cols / group, "{format}");
        assert_eq!(acts.sum.len(), 2 * cols / 32, "{format}");
        for (b, block) in x.chunks_exact(32).enumerate() {
            let sum: f64 = block.iter().map(|&v| v as f64).sum();
            assert!(
                (acts.sum[b] as f64 - sum).abs() <= 1e-5 * (1.0 + sum.abs()),
                "{format} block {b} sum"
            );
        }
        for (g, values) in x.chunks_exact(group).enumerate() {
            let amax = values.iter().fold(0f32, |a, v| a.max(v.abs()));
            let scale = acts.scale[g];
            assert_eq!(scale, amax / 32767.0, "{format} group {g} scale");
            for (i, &v) in values.iter().enumerate() {
                let k = g * group + i;
                let at = q16_position(format, k);
                let back = scale as f64 * (acts.q16[at] as f64 + acts.q16_lo[at] as f64 / 65536.0);
                let step = scale as f64 / 131072.0;
                assert!(
                    (back - v as f64).abs() <= step * 1.01 + 1e-6 * (v as f64).abs(),
                    "{format} value {k}: {v} held as {back}"
                );
            }
        }
    }
}

/// ggml's `quantize_row_q8_0` rule per 32-value block, written out: `(q, d)`.
fn q8_blocks(x: &[f32]) -> Vec<(Vec<i32>, f32)> {
    q8_blocks_of(x, 32)
}

/// The same rule with one scale per `len` values (256: ggml's `block_q8_K`).
fn q8_blocks_of(x: &[f32], len: usize) -> Vec<(Vec<i32>, f32)> {
    x.chunks_exact(len)
        .map(|b| {
            let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            (b.iter().map(|v| (v * id).round() as i32).collect(), d)
        })
        .collect()
}

#[test]
fn eight_bit_activations_give_the_product_with_the_rounded_activations() {
    // 37 x 544 (17 blocks: two groups of eight for the transposing VNNI kernel and one
    // after them; rows not a multiple of any chunk; K-quants 37 x 512 with one activation
    // scale per 256 values; 37 odd, so the K-quant transposing kernel's pairs of rows end
    // with a single one), 1..=8, 9 and 70 activation rows: every
    // group size of the SIMD kernels, every kernel this CPU runs, against an f64 product
    // of the dequantised weights and the activations rounded as ggml rounds them. The same
    // output must also stay within half an activation step of the f32 product (Σ|w|·d/2),
    // and differ from it (the 8-bit path is in use).
    // The K-quants at 512 (two super-blocks).
    let rows = 37;
    for (format, cols) in [
        (PackedFormat::Q8_0, 544),
        (PackedFormat::Q4_0, 544),
        (PackedFormat::Q4_1, 544),
        (PackedFormat::Q5_0, 544),
        (PackedFormat::Q5_1, 544),
        (PackedFormat::IQ4_NL, 544),
        (PackedFormat::Q4_K, 512),
        (PackedFormat::Q5_K, 512),
        (PackedFormat::Q6_K, 512),
        (PackedFormat::Q3_K, 512),
        (PackedFormat::IQ4_XS, 512),
        (PackedFormat::Q2_K, 512),
    ] {
        let w = values(rows * cols, 21);
        let packed = PackedMatrix::from_f32(rows, cols, &w, format)
            .unwrap()
            .with_activations(ActivationPrecision::Q8);
        let dense = packed.to_f32();
        // Prefill sizes too: 9 and 70 rows (70 is two blocks of activation rows in
        // `tiled_int8`, the second not a multiple of four); without VNNI the 32-value formats
        // keep f32 activations beyond `INT8_BLOCK32_MAX_ROWS`.
        for m in (1..=MATVEC_MAX_ROWS).chain([9, 70]) {
            if m > MATVEC_MAX_ROWS && !packed.int8_prefill(m) {
                let x = values(m * cols, 50);
                assert_close(
                    &packed.matmul_t(&x, m),
                    &reference(&packed, &x, m),
                    &format!("{format} prefill m={m}"),
                );
                continue;
            }
            let x = values(m * cols, 30 + m as u32);
            // One activation scale per 32 values, per 256 for the K-quants.
            let len = int8::scale_len(format);
            let blocks = q8_blocks_of(&x, len);
            let got = packed.matmul_t(&x, m);
            let acts = kernels::Acts::new(format, ActivationPrecision::Q8, &x, m, cols);
            // Every kernel this CPU runs, [rows, m] each.
            let each: Vec<(&str, Vec<f32>)> = int8::kernels(format)
                .into_iter()
                .map(|(name, kernel)| {
                    let mut out = vec![0f32; rows * m];
                    kernel(format, packed.bytes(), &acts, &mut out);
                    (name, out)
                })
                .collect();
            let (exact, _) = reference(&packed, &x, m);
            let mut moved = false;
            for j in 0..m {
                for r in 0..rows {
                    let wr = &dense[r * cols..(r + 1) * cols];
                    let (mut want, mut scale, mut bound) = (0f64, 0f64, 0f64);
                    for (b, (q, d)) in blocks[j * cols / len..(j + 1) * cols / len]
                        .iter()
                        .enumerate()
                    {
                        for (k, &q) in q.iter().enumerate() {
                            let wk = wr[b * len + k] as f64;
                            want += wk * q as f64 * *d as f64;
                            scale += (wk * q as f64 * *d as f64).abs();
                            bound += wk.abs() * *d as f64 / 2.0;
                        }
                    }
                    let tol = 1e-5 * (1.0 + scale);
                    let what = format!("{format} m={m} out[{j}][{r}]");
                    let g = got[j * rows + r] as f64;
                    assert!((g - want).abs() <= tol, "{what}: {g} vs {want}");
                    for (name, out) in &each {
                        let p = out[r * m + j] as f64;
                        assert!((p - want).abs() <= tol, "{what} {name}: {p} vs {want}");
                    }
                    let e = exact[j * rows + r] as f64;
                    assert!((g - e).abs() <= bound + tol, "{what}: {g} vs f32 {e}");
                    moved |= (g - e).abs() > 1e-4 * (1.0 + e.abs());
                }
            }
            assert!(moved, "{format} m={m}: the 8-bit path was not taken");
        }
    }
}

#[test]
fn empty_matrices_give_empty_or_zero_products() {
    // No columns (every output is an empty sum) or no rows, at decode and prefill sizes, for
    // a float, a block and a K-quant format, with either activations: zeros, never a panic.
    for format in [PackedFormat::F32, PackedFormat::Q8_0, PackedFormat::Q4_K] {
        for act in [ActivationPrecision::F32, ActivationPrecision::Q8] {
            for m in [1, MATVEC_MAX_ROWS + 1, 70] {
                let w = PackedMatrix::from_f32(3, 0, &[], format)
                    .unwrap()
                    .with_activations(act);
                assert_eq!(
                    w.matmul_t(&[], m),
                    vec![0f32; 3 * m],
                    "{format} {act:?} m={m}"
                );
                let cols = format.block_len().max(32) * 2;
                let w = PackedMatrix::from_f32(0, cols, &[], format)
                    .unwrap()
                    .with_activations(act);
                assert!(w.matmul_t(&vec![1.0; m * cols], m).is_empty());
            }
        }
    }
}

#[test]
fn eight_bit_activations_are_ggml_q8_0_blocks() {
    // Mixed magnitudes, an all-zero block, one block dominated by a single value, and a block
    // with -amax; one scale per 32 values (Q4_1) and per 256 (the K-quants, ggml's q8_K).
    for (format, cols) in [(PackedFormat::Q4_1, 128), (PackedFormat::Q4_K, 512)] {
        let len = int8::scale_len(format);
        let mut x = values(cols, 41);
        x[32..64].fill(0.0);
        x[64] = 1000.0;
        x[100] = -77.0;
        let mut acts = kernels::Acts::new(format, ActivationPrecision::Q8, &x, 1, cols);
        let mut scalar = kernels::Acts::new(format, ActivationPrecision::F32, &x, 1, cols);
        (scalar.q8, scalar.q8_scale, scalar.q8_sum) =
            (vec![0; cols], vec![0.0; cols / len], vec![0.0; cols / 32]);
        int8::quantize_scalar(&x, &mut scalar, len);
        for (b, (q, d)) in q8_blocks_of(&x, len).into_iter().enumerate() {
            let what = format!("{format}: block {b}");
            assert_eq!(acts.q8_scale[b], d, "{what} scale");
            assert_eq!(scalar.q8_scale[b], d, "{what} scale (scalar)");
            for (name, got) in [("simd", &acts.q8), ("scalar", &scalar.q8)] {
                let got: Vec<i32> = got[b * len..(b + 1) * len]
                    .iter()
                    .map(|&v| v as i32)
                    .collect();
                assert_eq!(got, q, "{what} quants ({name})");
            }
            for (c, q32) in q.chunks_exact(32).enumerate() {
                let sum = d * q32.iter().sum::<i32>() as f32;
                assert_eq!(acts.q8_sum[b * len / 32 + c], sum, "{what} sum {c}");
                assert_eq!(
                    scalar.q8_sum[b * len / 32 + c],
                    sum,
                    "{what} sum {c} (scalar)"
                );
            }
            assert!(q.iter().all(|v| v.abs() <= 127));
            for (k, v) in x[b * len..(b + 1) * len].iter().enumerate() {
                assert!(
                    (q[k] as f32 * d - v).abs() <= d * 0.5001,
                    "{what} value {k}"
                );
            }
        }
        acts.x = &[];
    }
}

// ---- K-quants (256-value super-blocks) ----

const K_FORMATS: [PackedFormat; 6] = [
    PackedFormat::Q2_K,
    PackedFormat::IQ4_XS,
    PackedFormat::Q3_K,
    PackedFormat::Q4_K,
    PackedFormat::Q5_K,
    PackedFormat::Q6_K,
];

/// Raw K-quant (or Q5_0/Q5_1/IQ4_NL) blocks with random quants and scales, and what the `gguf` Python
/// package dequantises them to (kiln-gguf's fixtures, `tools/gguf_reference.py`).
fn gguf_py_blocks(format: PackedFormat) -> (Vec<u8>, Vec<f32>) {
    let (bin, f32s): (&[u8], &[u8]) = match format {
        PackedFormat::Q4_K => (
            include_bytes!("../../../gguf/tests/fixtures/quant/Q4_K.bin"),
            include_bytes!("../../../gguf/tests/fixtures/quant/Q4_K.f32"),
        ),
        PackedFormat::Q5_K => (
            include_bytes!("../../../gguf/tests/fixtures/quant/Q5_K.bin"),
            include_bytes!("../../../gguf/tests/fixtures/quant/Q5_K.f32"),
        ),
        PackedFormat::Q2_K => (
            include_bytes!("../../../gguf/tests/fixtures/quant/Q2_K.bin"),
            include_bytes!("../../../gguf/tests/fixtures/quant/Q2_K.f32"),
        ),
        PackedFormat::IQ4_XS => (
            include_bytes!("../../../gguf/tests/fixtures/quant/IQ4_XS.bin"),
            include_bytes!("../../../gguf/tests/fixtures/quant/IQ4_XS.f32"),
        ),
        PackedFormat::Q3_K => (
            include_bytes!("../../../gguf/tests/fixtures/quant/Q3_K.bin"),
            include_bytes!("../../../gguf/tests/fixtures/quant/Q3_K.f32"),
        ),
        PackedFormat::Q6_K => (
            include_bytes!("../../../gguf/tests/fixtures/quant/Q6_K.bin"),
            include_bytes!("../../../gguf/tests/fixtures/quant/Q6_K.f32"),
        ),
        PackedFormat::Q5_0 => (
            include_bytes!("../../../gguf/tests/fixtures/quant/Q5_0.bin"),
            include_bytes!("../../../gguf/tests/fixtures/quant/Q5_0.f32"),
        ),
        PackedFormat::Q5_1 => (
            include_bytes!("../../../gguf/tests/fixtures/quant/Q5_1.bin"),
            include_bytes!("../../../gguf/tests/fixtures/quant/Q5_1.f32"),
        ),
        PackedFormat::IQ4_NL => (
            include_bytes!("../../../gguf/tests/fixtures/quant/IQ4_NL.bin"),
            include_bytes!("../../../gguf/tests/fixtures/quant/IQ4_NL.f32"),
        ),
        other => panic!("no gguf-py fixture for {other}"),
    };
    let values = f32s
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (bin.to_vec(), values)
}

#[test]
fn k_quant_dequantisation_is_ggml_bit_for_bit() {
    for format in K_FORMATS {
        let (bytes, want) = gguf_py_blocks(format);
        let blocks = bytes.len() / format.block_bytes();
        assert!(blocks >= 2, "{format}: fixture has {blocks} blocks");
        let packed = PackedMatrix::from_bytes(1, blocks * 256, format, &bytes).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&packed.to_f32()), bits(&want), "{format} vs gguf-py");
        let mut slow = vec![0f32; want.len()];
        kernels::dequantize_row_scalar(format, &bytes, &mut slow);
        assert_eq!(bits(&slow), bits(&want), "{format}: scalar vs gguf-py");
        // And kiln-gguf's dequantiser on blocks quantised here.
        let w = values(3 * 512, 21);
        let packed = PackedMatrix::from_f32(3, 512, &w, format).unwrap();
        let ggml = kiln_gguf::dequantize(kquant::ggml_type(format), packed.bytes()).unwrap();
        assert_eq!(bits(&packed.to_f32()), bits(&ggml), "{format} vs kiln-gguf");
    }
}

/// The 5-bit formats' fifth bits and offsets, and IQ4_NL's levels, against gguf-py's
/// dequantisation of random blocks: the scalar and SIMD paths, bit for bit.
#[test]
fn five_bit_and_iq4_nl_dequantisation_is_ggml_bit_for_bit() {
    for format in [PackedFormat::Q5_0, PackedFormat::Q5_1, PackedFormat::IQ4_NL] {
        let (bytes, want) = gguf_py_blocks(format);
        let packed = PackedMatrix::from_bytes(2, want.len() / 2, format, &bytes).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&packed.to_f32()), bits(&want), "{format} vs gguf-py");
        let mut slow = vec![0f32; want.len()];
        kernels::dequantize_row_scalar(format, &bytes, &mut slow);
        assert_eq!(bits(&slow), bits(&want), "{format}: scalar vs gguf-py");
    }
}

#[test]
fn k_quant_matmul_matches_the_dequantised_product() {
    // 37 rows (not a multiple of any chunk), two super-blocks a row; decode and prefill sizes.
    let (rows, cols) = (37, 512);
    let w = values(rows * cols, 22);
    for format in K_FORMATS {
        let packed = PackedMatrix::from_f32(rows, cols, &w, format).unwrap();
        for m in [1, 2, 3, 4, 5, MATVEC_MAX_ROWS, MATVEC_MAX_ROWS + 1, 33] {
            let x = values(m * cols, 23 + m as u32);
            let got = packed.matmul_t(&x, m);
            assert_close(&got, &reference(&packed, &x, m), &format!("{format} m={m}"));
        }
    }
}

/// Random bytes as quants and scales (gguf-py's fixture blocks: every scale and min bit
/// pattern, negative Q6_K scales), repeated into rows of different blocks: the SIMD kernel
/// against the portable one and against the f64 product.
#[test]
fn k_quant_simd_and_portable_kernels_agree_on_random_blocks() {
    for format in K_FORMATS {
        let (fixture, _) = gguf_py_blocks(format);
        let bb = format.block_bytes();
        let n_fix = fixture.len() / bb;
        let (rows, per_row) = (7, 3);
        let cols = per_row * 256;
        let bytes: Vec<u8> = (0..rows * per_row)
            .flat_map(|i| fixture[(i * 5 % n_fix) * bb..][..bb].to_vec())
            .collect();
        let packed = PackedMatrix::from_bytes(rows, cols, format, &bytes).unwrap();
        for m in 1..=6 {
            let x = values(m * cols, 30 + m as u32);
            let acts = kernels::Acts::new(format, ActivationPrecision::F32, &x, m, cols);
            let mut portable = vec![0f32; rows * m];
            kernels::dot_portable(format, packed.bytes(), &acts, &mut portable);
            // Random scales make large terms that cancel: allow f32 accumulation its rounding
            // of Σ|w·x| (2⁻²⁰ of it) besides the activations' split.
            let (want, bound) = reference(&packed, &x, m);
            let dense = packed.to_f32();
            let abs_sum = |r: usize, j: usize| -> f32 {
                (0..cols)
                    .map(|k| (dense[r * cols + k] * x[j * cols + k]).abs())
                    .sum()
            };
            let bound: Vec<f32> = (0..rows * m)
                .map(|i| bound[(i % m) * rows + i / m] + abs_sum(i / m, i % m) / 1048576.0)
                .collect();
            let want: Vec<f32> = (0..rows * m)
                .map(|i| want[(i % m) * rows + i / m])
                .collect();
            for (name, kernel) in kernels::kernels(format) {
                let mut fast = vec![0f32; rows * m];
                kernel(format, packed.bytes(), &acts, &mut fast);
                let what = format!("{format} m={m} {name}");
                assert_close(&fast, &(portable.clone(), bound.clone()), &what);
                assert_close(
                    &fast,
                    &(want.clone(), bound.clone()),
                    &format!("{what} vs f64"),
                );
            }
        }
    }
}

#[test]
fn hand_computed_q4_k_and_q6_k_blocks() {
    // Q4_K: d = 0.5, dmin = 0.25; sub-block j has scale 40 + j and min j (scales ≥ 16 use the
    // split 6-bit packing of sub-blocks 4..8); quant of value v is v % 16.
    let (sc, mn): (Vec<u8>, Vec<u8>) = (0..8u8).map(|j| (40 + j, j)).unzip();
    let mut packed_sc = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            packed_sc[j] = sc[j];
            packed_sc[j + 4] = mn[j];
        } else {
            packed_sc[j + 4] = (sc[j] & 0x0F) | ((mn[j] & 0x0F) << 4);
            packed_sc[j - 4] |= (sc[j] >> 4) << 6;
            packed_sc[j] |= (mn[j] >> 4) << 6;
        }
    }
    let mut block = f16::from_f32(0.5).to_le_bytes().to_vec();
    block.extend_from_slice(&f16::from_f32(0.25).to_le_bytes());
    block.extend_from_slice(&packed_sc);
    for j in 0..4 {
        for l in 0..32 {
            let (a, b) = ((64 * j + l) % 16, (64 * j + 32 + l) % 16);
            block.push(a as u8 | ((b as u8) << 4));
        }
    }
    let q4k = PackedMatrix::from_bytes(1, 256, PackedFormat::Q4_K, &block).unwrap();
    let want: Vec<f32> = (0..256)
        .map(|v| 0.5 * sc[v / 32] as f32 * (v % 16) as f32 - 0.25 * mn[v / 32] as f32)
        .collect();
    assert_eq!(q4k.to_f32(), want);
    let x: Vec<f32> = (0..256).map(|i| ((i % 7) as f32 - 3.0) * 0.125).collect();
    let dot: f64 = want
        .iter()
        .zip(&x)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum();
    let got = q4k.matmul_t(&x, 1)[0];
    assert!((got as f64 - dot).abs() < 1e-3, "{got} vs {dot}");

    // Q6_K: d = 0.125, group g has scale g − 8 (negative ones too), quant q = (v·5) % 64 − 32.
    let q = |v: usize| ((v * 5) % 64) as u8;
    let mut block = vec![0u8; 210];
    for n in 0..2 {
        for l in 0..32 {
            let v = |k: usize| q(128 * n + 32 * k + l);
            block[64 * n + l] = (v(0) & 0x0F) | ((v(2) & 0x0F) << 4);
            block[64 * n + 32 + l] = (v(1) & 0x0F) | ((v(3) & 0x0F) << 4);
            block[128 + 32 * n + l] =
                (v(0) >> 4) | ((v(1) >> 4) << 2) | ((v(2) >> 4) << 4) | ((v(3) >> 4) << 6);
        }
    }
    for g in 0..16 {
        block[192 + g] = (g as i8 - 8) as u8;
    }
    block[208..].copy_from_slice(&f16::from_f32(0.125).to_le_bytes());
    let q6k = PackedMatrix::from_bytes(1, 256, PackedFormat::Q6_K, &block).unwrap();
    let want: Vec<f32> = (0..256)
        .map(|v| 0.125 * (v / 16) as f32 - 1.0)
        .zip(0..256)
        .map(|(s, v)| s * (q(v) as f32 - 32.0))
        .collect();
    assert_eq!(q6k.to_f32(), want);
    let dot: f64 = want
        .iter()
        .zip(&x)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum();
    let got = q6k.matmul_t(&x, 1)[0];
    assert!((got as f64 - dot).abs() < 1e-3, "{got} vs {dot}");

    // Not a whole number of super-blocks, or a byte short: errors, not panics.
    assert!(PackedMatrix::from_bytes(1, 128, PackedFormat::Q6_K, &block).is_err());
    assert!(PackedMatrix::from_bytes(1, 256, PackedFormat::Q6_K, &block[..209]).is_err());
    assert!(PackedMatrix::from_f32(1, 32, &x[..32], PackedFormat::Q4_K).is_err());
}

#[test]
fn k_quant_non_finite_scales_are_found_by_row() {
    let (rows, cols) = (4, 512);
    let w = values(rows * cols, 24);
    for format in K_FORMATS {
        let packed = PackedMatrix::from_f32(rows, cols, &w, format).unwrap();
        assert_eq!(packed.first_non_finite_row(), None, "{format}");
        // A NaN `d` (Q6_K, Q3_K, IQ4_XS) or `dmin` (Q4_K, Q5_K) in row 2's second
        // super-block.
        let at = 2 * format.row_bytes(cols)
            + format.block_bytes()
            + match format {
                PackedFormat::Q6_K => 208,
                PackedFormat::Q3_K => 108,
                PackedFormat::IQ4_XS => 0,
                PackedFormat::Q2_K => 82,
                _ => 2,
            };
        let mut bytes = packed.bytes().to_vec();
        bytes[at..at + 2].copy_from_slice(&[0x00, 0x7E]);
        let bad = PackedMatrix::from_bytes(rows, cols, format, &bytes).unwrap();
        assert_eq!(bad.first_non_finite_row(), Some(2), "{format}");
    }
}

#[test]
fn vecmat_is_the_transposed_product_for_every_format() {
    // x · W against the dequantised rows summed in f64, for row counts that split unevenly over
    // the runs, with zero entries (skipped rows) and entries of both signs; the element
    // formats also at widths that are not whole 32-value runs (a tail after SIMD runs, a tail
    // alone).
    for (format, cols) in ALL.iter().map(|&f| (f, 96)).chain(
        ALL.iter()
            .filter(|f| f.block_len() == 1)
            .flat_map(|&f| [(f, 45), (f, 13)]),
    ) {
        for rows in [1, 3, 37, 1000] {
            let w = values(rows * cols, 5);
            let packed = PackedMatrix::from_f32(rows, cols, &w, format).unwrap();
            let dense = packed.to_f32();
            let mut x = values(rows, 9);
            x.iter_mut().step_by(4).for_each(|v| *v = 0.0);
            let got = packed.vecmat(&x);
            for (c, g) in got.iter().enumerate() {
                let want: f64 = (0..rows)
                    .map(|r| x[r] as f64 * dense[r * cols + c] as f64)
                    .sum();
                let scale: f64 = (0..rows)
                    .map(|r| (x[r] as f64 * dense[r * cols + c] as f64).abs())
                    .sum();
                assert!(
                    (*g as f64 - want).abs() <= 1e-5 * (1.0 + scale),
                    "{format} rows={rows} col {c}: {g} vs {want}"
                );
            }
        }
    }
    // K-quants too (256-value rows).
    let (rows, cols) = (11, 256);
    let packed =
        PackedMatrix::from_f32(rows, cols, &values(rows * cols, 3), PackedFormat::Q4_K).unwrap();
    let dense = packed.to_f32();
    let x = values(rows, 4);
    for (c, g) in packed.vecmat(&x).iter().enumerate() {
        let want: f64 = (0..rows)
            .map(|r| x[r] as f64 * dense[r * cols + c] as f64)
            .sum();
        assert!(
            (*g as f64 - want).abs() <= 1e-4,
            "q4_k col {c}: {g} vs {want}"
        );
    }
}

#[test]
fn formats_parse_from_their_names() {
    for f in PackedFormat::ALL {
        assert_eq!(f.name().parse::<PackedFormat>(), Ok(f));
        assert_eq!(f.name().to_uppercase().parse::<PackedFormat>(), Ok(f));
    }
    let err = "iq2_xs".parse::<PackedFormat>().unwrap_err();
    assert!(err.contains("iq2_xs") && err.contains("q8_0"), "{err}");
}

#[test]
fn rows_set_in_chunks_equal_the_whole_conversion() {
    let (rows, cols) = (10, 64);
    let w = values(rows * cols, 8);
    let whole = PackedMatrix::from_f32(rows, cols, &w, PackedFormat::Q8_0).unwrap();
    let mut parts = PackedMatrix::zeros(rows, cols, PackedFormat::Q8_0).unwrap();
    parts.set_rows_f32(0, &w[..3 * cols]).unwrap();
    parts.set_rows_f32(3, &w[3 * cols..]).unwrap();
    assert_eq!(parts.bytes(), whole.bytes());
    assert!(parts.set_rows_f32(8, &w[..3 * cols]).is_err());
    assert!(parts.set_rows_f32(0, &w[..cols + 1]).is_err());
}

#[test]
fn products_sharing_one_pass_match_each_dequantised_product() {
    // Matrices of different formats and row counts (some fewer than a task's share, so tasks
    // cross from one matrix into the next), one of them with 8-bit activations, against the
    // f64 oracle; up to MATVEC_MAX_ROWS activation rows (one pass) and past it (one by one).
    let cols = 256;
    let mats = [
        PackedMatrix::from_f32(5, cols, &values(5 * cols, 1), PackedFormat::F32).unwrap(),
        PackedMatrix::from_f32(37, cols, &values(37 * cols, 3), PackedFormat::Q8_0)
            .unwrap()
            .with_activations(ActivationPrecision::Q8),
        PackedMatrix::from_f32(1, cols, &values(cols, 4), PackedFormat::Q4_K).unwrap(),
        PackedMatrix::from_f32(64, cols, &values(64 * cols, 2), PackedFormat::Q4_1).unwrap(),
    ];
    let refs: Vec<&PackedMatrix> = mats.iter().collect();
    for m in [1, 3, MATVEC_MAX_ROWS, MATVEC_MAX_ROWS + 1] {
        let x = values(m * cols, 7);
        let got = PackedMatrix::matmul_t_many(&refs, &x, m);
        assert_eq!(got.len(), mats.len());
        for (w, y) in mats.iter().zip(&got) {
            let what = format!("{} [{}, {cols}] at m = {m}", w.format(), w.rows());
            // (Q8_0 at 9 rows is an 8-bit prefill: `INT8_BLOCK32_MAX_ROWS`.)
            if w.activations() == ActivationPrecision::Q8 {
                // The oracle with the activations rounded to ggml's 8-bit blocks.
                let rounded: Vec<f32> = q8_blocks(&x)
                    .into_iter()
                    .flat_map(|(q, d)| q.into_iter().map(move |q| q as f32 * d))
                    .collect();
                assert_close(y, &reference(w, &rounded, m), &what);
            } else {
                assert_close(y, &reference(w, &x, m), &what);
            }
        }
    }
    assert!(PackedMatrix::matmul_t_many(&[], &[], 1).is_empty());
}

#[test]
fn matvec_softmax_vecmat_is_the_three_steps_in_f64() {
    // Oracle: y = W·x, z_r = f(r, y_r), softmax(z) · W, each in f64 over the dequantised rows.
    // `f` mixes the row's state and index in, so a wrong row order or state slot shows; logits
    // rise with the row, a few units over each run of 3000 rows, so that later blocks raise
    // the running max (the rescaling path) while earlier ones still count; a few are −∞ (rows
    // not added). Rows 400..1400 do not need their product (f takes 0 there; the kernel must
    // pass it for every other row), and rows 1000..1200 sit 300 below the rest (weight 0).
    // Each case runs without a hint, with the true argmax and with a poor hint (row 7).
    use std::sync::atomic::{AtomicUsize, Ordering};
    for (format, cols, rows) in [
        (PackedFormat::F32, 45, 3000),
        (PackedFormat::F16, 96, 37),
        (PackedFormat::Q8_0, 96, 3000),
        (PackedFormat::Q4_1, 64, 3),
        (PackedFormat::Q4_K, 256, 300),
    ] {
        let packed = PackedMatrix::from_f32(rows, cols, &values(rows * cols, 7), format).unwrap();
        let dense = packed.to_f32();
        let x = values(cols, 8);
        let needs = |r: usize| !(400..1400).contains(&r);
        let f = |r: usize, y: f64, s: f64| {
            if r % 17 == 5 {
                f64::NEG_INFINITY
            } else {
                let low = if (1000..1200).contains(&r) {
                    300.0
                } else {
                    0.0
                };
                0.3 * y + s + (r as f64 * 0.002) - low
            }
        };
        let start: Vec<(f32, usize)> = (0..rows).map(|r| ((r % 13) as f32 * 0.5, r)).collect();
        let want_z: Vec<f64> = (0..rows)
            .map(|r| {
                let y: f64 = (0..cols)
                    .map(|c| x[c] as f64 * dense[r * cols + c] as f64)
                    .sum();
                f(r, if needs(r) { y } else { 0.0 }, start[r].0 as f64)
            })
            .collect();
        let want_argmax = (0..rows)
            .max_by(|&a, &b| want_z[a].total_cmp(&want_z[b]))
            .unwrap();
        let want_max = want_z[want_argmax];
        let want_sum: f64 = want_z.iter().map(|z| (z - want_max).exp()).sum();
        let tol = if format == PackedFormat::F32 || format == PackedFormat::F16 {
            1e-4
        } else {
            5e-3
        };
        for hint in [None, Some(want_argmax), Some(7.min(rows - 1))] {
            let what = format!("{format} rows={rows} hint {hint:?}");
            let mut state = start.clone();
            let skipped = AtomicUsize::new(0);
            let got = packed.matvec_softmax_vecmat(
                &x,
                &mut state,
                hint,
                |s| needs(s.1),
                |r, y, s| {
                    assert_eq!(r, s.1, "{what}: row {r} got another row's state");
                    let y = match y {
                        Some(y) => y as f64,
                        None => {
                            assert!(!needs(r), "{what}: row {r}'s product not given");
                            skipped.fetch_add(1, Ordering::Relaxed);
                            0.0
                        }
                    };
                    let z = f(r, if needs(r) { y } else { 0.0 }, s.0 as f64) as f32;
                    s.0 = f32::NAN;
                    z
                },
            );
            assert!(
                state.iter().all(|s| s.0.is_nan()),
                "{what}: a row not updated"
            );
            if rows == 3000 {
                assert!(skipped.into_inner() > 0, "{what}: no block skipped");
            }
            assert_eq!(got.argmax, want_argmax, "{what}: argmax");
            assert!(
                (got.max as f64 - want_max).abs() <= tol * (1.0 + want_max.abs()),
                "{what}: max {} vs {want_max}",
                got.max
            );
            assert!(
                (got.sum as f64 - want_sum).abs() <= tol * want_sum,
                "{what}: sum {} vs {want_sum}",
                got.sum
            );
            for c in 0..cols {
                let want: f64 = (0..rows)
                    .map(|r| (want_z[r] - want_max).exp() / want_sum * dense[r * cols + c] as f64)
                    .sum();
                let g = got.map[c] as f64;
                assert!(
                    (g - want).abs() <= tol * (1.0 + want.abs()),
                    "{what}: col {c}: {g} vs {want}"
                );
            }
        }
    }
}

#[test]
fn k_quant_kernels_hold_the_largest_integer_sums() {
    // Every weight at its format's largest |scale·quant| (Q4_K 15·63, Q5_K 31·63, Q6_K
    // (0 − 32)·(−128), Q3_K (0 − 4)·(0 − 32), IQ4_XS level −127 times 0 − 32), every
    // activation equal, so every i16 activation is 32767: the
    // kernels' i32 sums reach their bounds (Q6_K's only if it converts every four sub-blocks).
    let block = |format: PackedFormat| -> Vec<u8> {
        let mut b = vec![0u8; format.block_bytes()];
        let one = half::f16::from_f32(1.0).to_le_bytes();
        match format {
            PackedFormat::Q6_K => {
                b[192..208].fill(0x80); // scales −128; ql, qh zero: q − 32 = −32
                b[208..210].copy_from_slice(&one);
            }
            // Scales 0 − 32; qs and hmask zero: q − 4 = −4.
            PackedFormat::Q3_K => b[108..110].copy_from_slice(&one),
            // Scales 0 − 32; quants 0: level −127.
            PackedFormat::IQ4_XS => b[0..2].copy_from_slice(&one),
            // Scales and mins 15, quants 3, d = dmin = 1: 45 − 15.
            PackedFormat::Q2_K => {
                b[..80].fill(0xFF);
                b[80..82].copy_from_slice(&one);
                b[82..84].copy_from_slice(&one);
            }
            _ => {
                b[0..2].copy_from_slice(&one); // d = 1, dmin = 0
                // Scales 63, mins 0 (scale_min_k4's split packing for sub-blocks 4..8).
                b[4..8].fill(0xFF);
                b[12..16].fill(0x0F);
                b[16..].fill(0xFF); // Q5_K: qh then qs, all bits set; Q4_K: qs
            }
        }
        b
    };
    for format in K_FORMATS {
        let (rows, cols) = (3, 512);
        let bytes: Vec<u8> = (0..rows * cols / 256).flat_map(|_| block(format)).collect();
        let packed = PackedMatrix::from_bytes(rows, cols, format, &bytes).unwrap();
        let top = match format {
            PackedFormat::Q4_K => 15.0 * 63.0,
            PackedFormat::Q5_K => 31.0 * 63.0,
            PackedFormat::Q3_K => 128.0,
            PackedFormat::IQ4_XS => 4064.0,
            PackedFormat::Q2_K => 30.0,
            _ => 4096.0,
        };
        assert_eq!(packed.to_f32()[0], top, "{format} test block");
        for m in 1..=5 {
            let x = vec![0.75f32; m * cols];
            let acts = kernels::Acts::new(format, ActivationPrecision::F32, &x, m, cols);
            let want = vec![top * 0.75 * cols as f32; rows * m];
            for (name, kernel) in kernels::kernels(format) {
                let mut got = vec![0f32; rows * m];
                kernel(format, packed.bytes(), &acts, &mut got);
                assert_close(
                    &got,
                    &(want.clone(), vec![0.0; rows * m]),
                    &format!("{format} m={m} {name}"),
                );
            }
        }
    }
}
