"""seqserve.export"""
