//! Distilling step-by-step (arXiv 2305.02301). Work in progress.
