"""The data side of a run, stage by stage, before a batch reaches the model:

1. read      read.py (the sources of --data, each sample's structure checked, in the messages form), with
             formats.py (the other tools' formats), hf_datasets.py (datasets on disk), samples.py (the samples'
             compact store) and pairs.py (preference pairs, as two samples each);
2. check     media_check.py (every image and video opened, or its header read), with media.py (what an image
             reference is and how it loads) and fetch.py (URLs, within a deadline);
3. measure   lengths.py (each sample's tokens, as the collator will make them), remembered in index.py
             (the data index, so that a second start skips 2 and 3); checked.py runs 1 to 3 as a run starts;
4. batch     batching.py (which samples go into each micro-batch of each rank, epoch by epoch);
5. collate   qwen_ft/collate.py (the tensors of a micro-batch), outside this package: it is the model's side.
"""
