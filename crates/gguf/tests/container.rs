//! The GGUF container: round trips through a small writer, rejection of bad files, and a
//! fuzz-ish test (truncation at many points, byte flips) that must never panic.

mod common;

use common::{TensorSpec, s, str_array, write_gguf};
use kiln_gguf::{GgmlType, GgufError, GgufFile, Value, ValueType};

fn all_values() -> Vec<(&'static str, Value)> {
    vec![
        ("general.architecture", s("llama")),
        ("t.u8", Value::U8(200)),
        ("t.i8", Value::I8(-100)),
        ("t.u16", Value::U16(60000)),
        ("t.i16", Value::I16(-30000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.f32", Value::F32(1.5)),
        ("t.bool", Value::Bool(true)),
        ("t.string", s("héllo ▁ world")),
        ("t.u64", Value::U64(u64::MAX)),
        ("t.i64", Value::I64(i64::MIN)),
        ("t.f64", Value::F64(-2.25)),
        ("t.array_str", str_array(&["a", "", "ccc"])),
        (
            "t.array_empty",
            Value::Array {
                elem_type: ValueType::F32,
                items: vec![],
            },
        ),
        (
            "t.nested",
            Value::Array {
                elem_type: ValueType::Array,
                items: vec![
                    Value::Array {
                        elem_type: ValueType::I32,
                        items: vec![Value::I32(1), Value::I32(-2)],
                    },
                    str_array(&["x"]),
                ],
            },
        ),
    ]
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn sample_tensors() -> Vec<TensorSpec> {
    // A 2x3 F32 matrix, a Q8_0 vector of 64 and a 2x32 F16 matrix.
    let mut q8 = vec![0x00, 0x3C]; // d = 1.0
    q8.extend((0..32).map(|i| i as u8));
    q8.extend_from_slice(&[0x00, 0x40]); // d = 2.0
    q8.extend((0..32).map(|i| (-(i as i8)) as u8));
    let f16: Vec<u8> = (0..64)
        .flat_map(|i| half::f16::from_f32(i as f32 * 0.25).to_bits().to_le_bytes())
        .collect();
    vec![
        TensorSpec {
            name: "m".into(),
            dims: vec![3, 2],
            ggml_type: GgmlType::F32,
            data: f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        },
        TensorSpec {
            name: "q".into(),
            dims: vec![64],
            ggml_type: GgmlType::Q8_0,
            data: q8,
        },
        TensorSpec {
            name: "h".into(),
            dims: vec![32, 2],
            ggml_type: GgmlType::F16,
            data: f16,
        },
    ]
}

fn sample_file(version: u32) -> Vec<u8> {
    write_gguf(version, &all_values(), &sample_tensors(), 32)
}

#[test]
fn round_trip_v3_and_v2() {
    for version in [2, 3] {
        let f = GgufFile::from_bytes("sample.gguf", sample_file(version)).unwrap();
        assert_eq!(f.version(), version);
        assert_eq!(f.alignment(), 32);
        assert_eq!(f.data_offset() % 32, 0);
        for (k, v) in all_values() {
            assert_eq!(f.get(k), Some(&v), "{k}");
        }
        assert_eq!(
            f.metadata()
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>(),
            all_values().iter().map(|(k, _)| *k).collect::<Vec<_>>()
        );
        let names: Vec<_> = f.tensors().iter().map(|t| t.name()).collect();
        assert_eq!(names, ["m", "q", "h"]);

        let (shape, m) = f.tensor_f32("m").unwrap();
        assert_eq!(shape, [2, 3]);
        assert_eq!(m, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let (shape, q) = f.tensor_f32("q").unwrap();
        assert_eq!(shape, [64]);
        assert_eq!(q[5], 5.0);
        assert_eq!(q[32 + 5], -10.0);
        let (shape, h) = f.tensor_f32("h").unwrap();
        assert_eq!(shape, [2, 32]);
        assert_eq!(h[33], 33.0 * 0.25);
        let info = f.tensor_info("h").unwrap();
        assert_eq!(info.dims(), [32, 2]);
        assert_eq!(info.n_bytes(), 128);
        assert_eq!(info.ggml_type(), GgmlType::F16);
        assert_eq!(f.tensor_bytes("h").unwrap().len(), 128);

        assert!(matches!(
            f.tensor_f32("nope"),
            Err(GgufError::TensorNotFound { .. })
        ));
    }
}

#[test]
fn custom_alignment() {
    let mut kvs = all_values();
    kvs.push(("general.alignment", Value::U32(64)));
    let bytes = write_gguf(3, &kvs, &sample_tensors(), 64);
    let f = GgufFile::from_bytes("aligned.gguf", bytes).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.tensor_f32("m").unwrap().1[5], 6.0);

    let mut kvs = all_values();
    kvs.push(("general.alignment", Value::U32(48)));
    let bytes = write_gguf(3, &kvs, &sample_tensors(), 48);
    let err = GgufFile::from_bytes("bad-align.gguf", bytes).unwrap_err();
    assert!(err.to_string().contains("general.alignment"), "{err}");
}

#[test]
fn open_reads_from_disk() {
    let dir = std::env::temp_dir().join(format!("kiln-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.gguf");
    std::fs::write(&path, sample_file(3)).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.tensor_f32("m").unwrap().1.len(), 6);
    assert_eq!(f.path(), path.display().to_string());

    let empty = dir.join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        GgufFile::open(&empty),
        Err(GgufError::BadMagic { .. })
    ));
    let missing = dir.join("missing.gguf");
    let err = GgufFile::open(&missing).unwrap_err();
    assert!(matches!(err, GgufError::Io { .. }));
    assert!(err.to_string().contains("missing.gguf"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn rejects_bad_files_with_clear_errors() {
    let good = sample_file(3);

    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(
        GgufFile::from_bytes("x.gguf", b),
        Err(GgufError::BadMagic { .. })
    ));

    let mut b = good.clone();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    let err = GgufFile::from_bytes("v1.gguf", b).unwrap_err();
    assert!(
        matches!(err, GgufError::UnsupportedVersion { version: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("v1"), "{err}");

    let mut b = good.clone();
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    let err = GgufFile::from_bytes("be.gguf", b).unwrap_err();
    assert!(err.to_string().contains("big-endian"), "{err}");

    // Absurd metadata count.
    let mut b = good.clone();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = GgufFile::from_bytes("count.gguf", b).unwrap_err();
    assert!(matches!(err, GgufError::Invalid { .. }), "{err}");

    // Absurd tensor count.
    let mut b = good.clone();
    b[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes("count.gguf", b),
        Err(GgufError::Invalid { .. })
    ));

    // Key length past the end of the file.
    let mut b = good.clone();
    b[24..32].copy_from_slice(&(1u64 << 50).to_le_bytes());
    let err = GgufFile::from_bytes("keylen.gguf", b).unwrap_err();
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");

    // Truncated header.
    let err = GgufFile::from_bytes("short.gguf", good[..10].to_vec()).unwrap_err();
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");

    // Tensor data cut off: names the tensor.
    let err = GgufFile::from_bytes("cut.gguf", good[..good.len() - 10].to_vec()).unwrap_err();
    match &err {
        GgufError::TensorOutOfBounds { tensor, path, .. } => {
            assert_eq!(tensor, "h");
            assert_eq!(path, "cut.gguf");
        }
        other => panic!("expected TensorOutOfBounds, got {other}"),
    }

    // Unknown ggml type.
    let mut t = sample_tensors();
    t.truncate(1);
    let mut bad = write_gguf(3, &[], &t, 32);
    // Write the type id directly: header 24 + name (8 + 1) + n_dims 4 + dims 16 = 53.
    bad[53..57].copy_from_slice(&99u32.to_le_bytes());
    let err = GgufFile::from_bytes("type.gguf", bad).unwrap_err();
    assert!(
        matches!(&err, GgufError::UnknownGgmlType { tensor, type_id: 99, .. } if tensor == "m"),
        "{err}"
    );

    // Unknown metadata value type.
    let b = write_gguf(3, &[("k", Value::U8(1))], &[], 32);
    let mut bad = b.clone();
    bad[24 + 8 + 1..24 + 8 + 1 + 4].copy_from_slice(&77u32.to_le_bytes());
    let err = GgufFile::from_bytes("vt.gguf", bad).unwrap_err();
    assert!(err.to_string().contains("`k`"), "{err}");

    // Duplicate key.
    let b = write_gguf(3, &[("k", Value::U8(1)), ("k", Value::U8(2))], &[], 32);
    assert!(matches!(
        GgufFile::from_bytes("dup.gguf", b),
        Err(GgufError::Invalid { .. })
    ));

    // Row length not a multiple of the block size.
    let t = vec![TensorSpec {
        name: "odd".into(),
        dims: vec![16],
        ggml_type: GgmlType::Q8_0,
        data: vec![0; 34],
    }];
    let err = GgufFile::from_bytes("odd.gguf", write_gguf(3, &[], &t, 32)).unwrap_err();
    assert!(err.to_string().contains("`odd`"), "{err}");

    // Overflowing dims.
    let t = vec![TensorSpec {
        name: "huge".into(),
        dims: vec![u64::MAX / 2, 4],
        ggml_type: GgmlType::F32,
        data: vec![],
    }];
    let err = GgufFile::from_bytes("huge.gguf", write_gguf(3, &[], &t, 32)).unwrap_err();
    assert!(err.to_string().contains("`huge`"), "{err}");

    // Arrays nested too deep.
    let mut v = Value::U8(0);
    for _ in 0..20 {
        v = Value::Array {
            elem_type: v.value_type(),
            items: vec![v],
        };
    }
    let err =
        GgufFile::from_bytes("deep.gguf", write_gguf(3, &[("deep", v)], &[], 32)).unwrap_err();
    assert!(err.to_string().contains("nested"), "{err}");

    // An array whose count cannot fit.
    let b = write_gguf(3, &[("arr", str_array(&["a"]))], &[], 32);
    let mut bad = b.clone();
    let count_pos = 24 + 8 + 3 + 4 + 4;
    bad[count_pos..count_pos + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let err = GgufFile::from_bytes("arr.gguf", bad).unwrap_err();
    assert!(err.to_string().contains("`arr`"), "{err}");
}

#[test]
fn unsupported_dequant_type_is_an_error() {
    let t = vec![TensorSpec {
        name: "iq".into(),
        dims: vec![256],
        ggml_type: GgmlType::IQ2_XXS,
        data: vec![0; 66],
    }];
    let f = GgufFile::from_bytes("iq.gguf", write_gguf(3, &[], &t, 32)).unwrap();
    let err = f.tensor_f32("iq").unwrap_err();
    assert!(matches!(
        err,
        GgufError::UnsupportedType {
            ggml_type: GgmlType::IQ2_XXS,
            ..
        }
    ));
    assert!(
        err.to_string().contains("`iq`") && err.to_string().contains("iq.gguf"),
        "{err}"
    );
    assert_eq!(f.tensor_bytes("iq").unwrap().len(), 66);
}

/// Everything a loader would do with a file; must return, never panic.
fn exercise(name: &str, bytes: Vec<u8>) -> bool {
    match GgufFile::from_bytes(name, bytes) {
        Err(e) => {
            let _ = e.to_string();
            false
        }
        Ok(f) => {
            for t in f.tensors() {
                let _ = f.tensor_f32(t.name());
            }
            let _ = f.llama_metadata();
            let _ = f.chat_template();
            let _ = f.tokenizer();
            true
        }
    }
}

/// Deterministic xorshift, so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn fuzz_synthetic_file_never_panics() {
    let good = sample_file(3);
    // Every truncation point.
    for cut in 0..good.len() {
        assert!(
            !exercise("cut.gguf", good[..cut].to_vec()),
            "cut at {cut} parsed"
        );
    }
    // Single and multiple byte flips everywhere in the header, some in the data.
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut parsed = 0;
    for i in 0..6000 {
        let mut b = good.clone();
        let n = 1 + (i % 4);
        for _ in 0..n {
            let pos = (rng.next() as usize) % b.len();
            b[pos] = match rng.next() % 4 {
                0 => 0xFF,
                1 => 0x00,
                2 => b[pos] ^ (1 << (rng.next() % 8)),
                _ => rng.next() as u8,
            };
        }
        parsed += exercise("flip.gguf", b) as usize;
    }
    eprintln!("byte flips: {parsed} of 6000 mutated files still parsed");
}

#[test]
fn fuzz_real_vocab_file_never_panics() {
    let Some(path) = common::shared_tokenizer_file("llama-vocab-tests/ggml-vocab-llama-spm.gguf")
    else {
        return;
    };
    let good = std::fs::read(&path).unwrap();
    assert!(exercise("real.gguf", good.clone()));
    let mut rng = Rng(12345);
    // Truncate at 60 points (denser in the first few KB, where the header and metadata are).
    let mut cuts: Vec<usize> = (0..30).map(|i| i * 97).collect();
    cuts.extend((0..30).map(|_| (rng.next() as usize) % good.len()));
    let mut parsed = 0;
    for cut in cuts {
        parsed += exercise("cut.gguf", good[..cut].to_vec()) as usize;
    }
    eprintln!("truncations: {parsed} of 60 still parsed (cuts inside trailing padding may)");
    // Byte flips in the first 4 KB (header, the first metadata entries).
    for _ in 0..40 {
        let mut b = good.clone();
        let pos = (rng.next() as usize) % 4096.min(b.len());
        b[pos] ^= 1 << (rng.next() % 8);
        exercise("flip.gguf", b);
    }
}
