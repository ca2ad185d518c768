//! Model files are untrusted input: loaders under a seeded fuzzer (`untrusted/fuzz.rs`) and
//! files claiming absurd sizes (`untrusted/absurd_sizes.rs`), both measured by the counting
//! allocator of `fuzzing/`, in one test binary.

mod common;
mod fuzzing;

#[global_allocator]
static ALLOC: fuzzing::CountingAlloc = fuzzing::CountingAlloc;

mod untrusted {
    mod absurd_sizes;
    mod fuzz;
}
