"""Evaluation: per-organ metrics (`metrics`), running models on labelled cases (`runner`), tables and montages
(`report`)."""
