"""GPT-1 supervised fine-tuning (Radford et al. 2018): input transforms, task head, L3 loss, tasks.

  transforms  special tokens (<|start|>, <|delim|>, <|extract|>) and the per-task token layouts
  batches     task records -> fixed-shape [B, N, T] arrays and train/eval batches
  heads       linear head W_y on the extract token's hidden state; vocabulary growth helper
  losses      L3 = L2 (task cross-entropy) + aux_lm_weight * L1 (LM loss on the same inputs)
  tasks       synthetic classification / entailment / similarity / multiple-choice tasks
  pretrain    a tiny GPT pretrained on the synthetic corpus with the task tokens in its vocabulary
"""
