//! The backend this build runs on, chosen by cargo feature. With several enabled, the most
//! specific wins: cuda, then metal, vulkan, wgpu, then flex, then ndarray.

#[cfg(feature = "cuda")]
mod chosen {
    /// The backend of this build.
    pub type Backend = burn::backend::Cuda;
    /// Its name, for reports.
    pub const NAME: &str = "cuda";
}
#[cfg(all(feature = "metal", not(feature = "cuda")))]
mod chosen {
    /// The backend of this build.
    pub type Backend = burn::backend::Metal;
    /// Its name, for reports.
    pub const NAME: &str = "metal";
}
#[cfg(all(feature = "vulkan", not(any(feature = "cuda", feature = "metal"))))]
mod chosen {
    /// The backend of this build.
    pub type Backend = burn::backend::Vulkan;
    /// Its name, for reports.
    pub const NAME: &str = "vulkan";
}
#[cfg(all(
    feature = "wgpu",
    not(any(feature = "cuda", feature = "metal", feature = "vulkan"))
))]
mod chosen {
    /// The backend of this build.
    pub type Backend = burn::backend::Wgpu;
    /// Its name, for reports.
    pub const NAME: &str = "wgpu";
}
#[cfg(all(
    feature = "flex",
    not(any(
        feature = "cuda",
        feature = "metal",
        feature = "vulkan",
        feature = "wgpu"
    ))
))]
mod chosen {
    /// The backend of this build.
    pub type Backend = burn::backend::Flex;
    /// Its name, for reports.
    pub const NAME: &str = "flex";
}
#[cfg(all(
    feature = "ndarray",
    not(any(
        feature = "cuda",
        feature = "metal",
        feature = "vulkan",
        feature = "wgpu",
        feature = "flex"
    ))
))]
mod chosen {
    /// The backend of this build.
    pub type Backend = burn::backend::NdArray;
    /// Its name, for reports.
    pub const NAME: &str = "ndarray";
}
#[cfg(not(any(
    feature = "cuda",
    feature = "metal",
    feature = "vulkan",
    feature = "wgpu",
    feature = "flex",
    feature = "ndarray"
)))]
compile_error!("kiln needs a backend feature: ndarray, flex, wgpu, vulkan, metal or cuda");

pub use chosen::{Backend, NAME};

/// The default device of [`Backend`].
pub fn device() -> burn::tensor::Device<Backend> {
    Default::default()
}
