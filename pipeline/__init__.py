"""
What the five stages are built from, below them and above model.py (the method). A stage imports model.py and
these modules, never another stage; nothing here imports a stage (tests/test_import_layers.py checks it).

    io                        shared by every stage: strict JSON/JSONL, images, model folders, the prompt
                              contract and batching, run checkpoints and PEFT export
    activation_checkpointing  the cache-safe activation checkpointing of the loop (train.py --grad-ckpt)
    stage 1, prepare_data.py  segmentation_sources (MSD, BiomedParse), image_facts (what a mask shows),
                              llm_teacher (§A.2), quality_gate (§A.3 and Table 4's question types)
    stage 2-5, the encoder    roi_encoder: the frozen encoder of the ROI targets, its patch grid and heatmaps
    stage 3, train.py         training_data, training_process (device, DDP), trainer_state (exact resume),
                              run_log (log.jsonl, loss.png, L_vis's baselines), memory_plan (train.py --plan)
    stages 4-5                scaffolds (a checkpoint with its scaffolds re-attached), vqa_metrics (§B.4 scoring),
                              text_window (evaluate.py --text-window: does step k's sentence state its finding?),
                              fast_inference (a static KV cache and fixed-shape steps for CUDA graphs)
"""
