"""Convert Meta's pretrained Demucs v4 models to ONNX files for the OpenKara app.

One module per pipeline step: `loading` (demucs' own loader), `spectral` (STFT/ISTFT as real
matmuls), `exportable` (the ONNX-friendly HTDemucs forward), `export`, `runtime_shapes` (shape
arithmetic that no optimizer folds), `optimize` (ONNX Runtime offline optimization), `storage`
(float16 weights), `metadata`, `validation` + `accuracy` (the gate), `contract`, `pipeline`
(convert, end to end), `evidence`, `github`, `tags`, `release`, `catalog`, `pins`, `upstream`;
DEVELOPERS.md maps all.
"""

__version__ = "0.5.1"
