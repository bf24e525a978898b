"""The methods calora implements, one package each: its math, its file format, its stage."""
