"""The foundation every layer uses: the registry type of pluggable parts, atomic writes and Parquet, the results
tree's paths and progress bars. Imports nothing else of kalmanrl."""
