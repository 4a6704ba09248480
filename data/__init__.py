"""Datasets on disk: the manifest, the annotation readers (index masks, COCO, labelme), image
reading, validation, defect instances, splits and the synthetic generator. Imports only
`dli.common`."""
