"""Data: synthetic pairs (`synth`), HDF5 and Kaggle I/O (`io`), labelme (`labelme`), label checks
(`validate`) and the dataset card (`report`). Nothing is imported here, so `import chromoseg` stays fast.
"""
