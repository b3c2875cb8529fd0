"""Run and compare directories: file names (:mod:`fedlayer.run.files`), writing, reading, reports, figures."""
