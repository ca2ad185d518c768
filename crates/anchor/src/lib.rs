//! AnLLM anchor-based attention (arXiv 2402.07616). Work in progress.
