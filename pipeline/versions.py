"""Format versions, importable without torch: the quick up-to-date checks (pipeline/stamps.py) compare them before
any heavy import, and the modules that own the formats re-export them."""

# the teacher cache's Arrow schema and manifest (pipeline/cache/schema.py); 4 added the teacher's next-token
# log-probabilities and the chunk alignment; 5: align_label translates the teacher's top-1 across leading whitespace
# as the alignment trims it (alignment.LabelMap: a SentencePiece student's first response word gets its label);
# 6: the cache belongs to the teacher (no student columns, no student tokenizer in its fingerprint) and each student
# tokenizer reads it through a student view beside it (views/, pipeline/cache/views.py)
SCHEMA_VERSION = 6
