# One command sets up and runs the demo, one sets up and runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-out

.PHONY: setup demo test lint bench clean

$(BIN)/tk: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,onnx,tensorboard,mlflow,tune,serve,review,multilabel]'
	touch $(BIN)/tk

setup: $(BIN)/tk

# Fine-tune on the embedded shapes dataset (random init: no weights can be downloaded
# offline), then predict over a folder of freshly drawn shapes.
demo: setup
	TK_HOME=$(DEMO_DIR)/store $(BIN)/tk finetune --backbone resnet18 --classes 5 \
	    --no-pretrained --epochs 5 --name demo --overwrite
	$(BIN)/python examples/export_dataset.py shapes $(DEMO_DIR)/images --classes 5 --per-class 4 --seed 2026
	TK_HOME=$(DEMO_DIR)/store $(BIN)/tk infer $(DEMO_DIR)/images --model demo --format table

test: setup
	$(BIN)/ruff check toolkit plugins model_store tests benchmarks examples
	$(BIN)/pytest -q -n 2 --dist loadgroup

bench: setup
	$(BIN)/python benchmarks/bench_infer.py
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) build dist *.egg-info
