"""The data a stage reads: records and their errors (`records`), tokenization of prompts and responses (`tokenize`),
token alignment between two tokenizers (`alignment`), and the built-in default task (`default_task`)."""
