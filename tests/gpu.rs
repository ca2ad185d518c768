//! The GPU stage of `tools/test.sh`: the backend-sensitive tests (kernel checks, the Llama, T5
//! and NLLB parity tests in f32 and f16, the generate/translate examples) linked into one test
//! binary. Each of them is also its own test binary on the CPU backends; on wgpu, five binaries
//! each instantiated the models over the fused CubeCL backend and took 10.6 of CI's 48 minutes to
//! compile, so the wgpu stage builds this one instead.

#[path = "backend_ops.rs"]
mod backend_ops;
#[path = "examples.rs"]
mod examples;
#[path = "llama_parity.rs"]
mod llama_parity;
#[path = "nllb_parity.rs"]
mod nllb_parity;
#[path = "t5_parity.rs"]
mod t5_parity;
