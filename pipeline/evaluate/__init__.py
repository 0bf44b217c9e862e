"""Evaluation and research tools: the suites, presets and result files (`suites`), metrics (`metrics`), the external
harness (`harness`), tables and plots (`report`), the loss simulation (`simulation`), and the DSKD paper's
representation analysis (`analysis`)."""
