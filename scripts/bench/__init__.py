"""The benchmark's parts: the development set, the Slicer peer methods and the harness."""
