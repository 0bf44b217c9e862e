"""Stage 2's training machinery: checkpoints and the all-ranks commit (`checkpoint`), the resumable sampler
(`sampler`), metrics and logs (`tracking`), and rank set-up (`distributed`)."""
