"""Evaluation: perplexity, zero-shot multiple choice by log-likelihood, S-NIAH, sampling."""
