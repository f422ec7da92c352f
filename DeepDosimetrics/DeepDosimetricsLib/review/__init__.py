"""The browser review station (``deepdosimetrics review``): clinicians inspect reconstructions in a web page.

- :mod:`.catalog`: the cohort's encoded patients, their metrics and the outcome-analysis summary; ids checked
- :mod:`.verdicts`: ``ENC_DIR/review.csv`` (the only file the station writes)
- :mod:`.security`: bind address, access token, the HTTP/websocket gate
- :mod:`.scene`: one patient's volumes as MRML nodes in the trame-slicer scene (compact types)
- :mod:`.dvh`: DVH curves of the original and the reconstructed dose
- :mod:`.traversal`: latent traversal, decoding the patient's cached tile features
- :mod:`.app`: the trame application

Only catalog, verdicts and security import nothing heavy; scene, traversal and app import slicer/trame/torch.
"""
