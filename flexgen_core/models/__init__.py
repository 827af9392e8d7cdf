"""Model families: pure math and checkpoint layouts, no knowledge of where tensors live."""
