"""Weight-only int8/int4 quantization of a whole model (issue 19): `scheme.py` chooses each matrix's bits and
group size (FineQuant's adaptive granularity), `model.py` says which parameters are quantized and puts their
`QuantLinear`s in place, `folder.py` writes and checks a quantized folder, `convert.py` is `ferry convert
--quantization`. The kernels behind `QuantLinear` are ferry.ops.quant's; the loader (ferry.models.loader) calls
in here."""
