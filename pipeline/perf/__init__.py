"""`capfilt bench perf`: how fast the pipeline is, where its time goes, and what Ray costs.

Not tests: these modules run the real pipeline and the plain Hugging Face loop and print figures.
May import everything but `cli`.
"""
