//! DeePEn ensembling (arXiv 2404.12715). Work in progress.
