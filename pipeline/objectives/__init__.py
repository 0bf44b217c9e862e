"""Objectives: compose a Batch, the student's hidden states, the projectors and the losses into one training loss.

Every objective is L = (1 - alpha) * CE + alpha * KD (reference sections 2-7), each term already normalised:
- sft        CE only, alpha ignored (seqkd is sft on teacher-generated responses).
- kd         KD = D(teacher, student) in the shared vocabulary (heads of one family truncated to the shared ids).
- dskd       v1, same vocabulary: KD = t2s_kd + t2s_ce (gold labels) + s2t_kd, projectors t2s and s2t trained.
- dskd_v2    same vocabulary: t2s initialised by logit identity, t2s_ce on the teacher's argmax, t2s_kd masked to
             positions where the projected teacher agrees with the teacher (a local fraction), s2t from the heads.
- dskd_eta   dskd_v2 across vocabularies on the cached exact-token alignments (labels: the teacher's top-1 mapped
             to the student id with the same text, -100 when there is none).
- dskd_cma   v1 cross-model attention: student queries attend over the teacher's positions of the same example.
- uld        sorted-probability L1 between the i-th response positions of both sides (any vocabularies).
- mined      the teacher's distribution carried into the student vocabulary by a minimum-edit-distance token map,
             at the exactly aligned positions.
- overlap_kd KD at the exactly aligned positions on the shared sub-vocabulary (tokens of the same text), both
             distributions renormalised there.
- alm        approximate likelihood matching: the chunk likelihoods of both sides (every student token lies in a
             chunk) compared with a binarised divergence (objectives/alm.py says which variant and why).
- alm_eta    alm plus dskd_eta's dual-space terms on the exactly aligned positions.
- s2t_divergence: fkl reproduces DSKD v1, which uses forward KL in the teacher-space term whatever the divergence.
Normalisation: sums are divided by the global token normaliser N-bar (losses.token_normaliser) so accumulation and
world size do not change the scale; v2's agreement-masked and ETA terms use local counts, as the reference does.
Memory: vocabulary-sized tensors are only built inside `chunks.chunked`, a chunk of positions at a time, each chunk's
gradients taken in its forward pass (fused), so no objective holds more than one chunk's (positions, vocabulary)
logits per space and none computes a chunk twice; on CUDA, sft and kd may go to Liger-Kernel (`liger.py`).
The table of objectives (`table.py`) declares each one; `objective.Objective` dispatches to its function.
The teacher model is never needed: its logits come from cached hidden states x its head (dense) or from the cached
top-k + log-sum-exp (sparse), and `teacher_max_err` proves the dense recomputation against the cached top-k.
"""
