"""Corpus loading, tokenisation, on-disk token cache and the contiguous train/validation split."""
