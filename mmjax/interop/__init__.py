"""Reading (and writing) checkpoints of other ecosystems: file formats, key maps, config
translation. What comes out are the project's own modules, parameter trees and tokenizers;
nothing below this package knows that a tensor or a vocabulary came from elsewhere."""
